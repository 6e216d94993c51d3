"""Training: the config tree, losses, the teacher, optimisation, data parallelism, one epoch,
run checkpoints, records, and ``train(config)``, the outline of a run."""

from cait.training.config import TrainConfig, apply_overrides, config_from_dict, load_recipe
from cait.training.run import TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "config_from_dict",
    "load_recipe",
    "train",
]
