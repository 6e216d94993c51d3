"""The training config tree: frozen, validated dataclasses; recipes are YAML files of them.

A recipe (``recipes/*.yaml``) holds any subset of the fields; ``--set section.field=value``
overrides one field (values are parsed as YAML). Derived values such as the scaled learning
rate are computed by properties and functions, never written back into the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from cait.data.config import AugmentConfig, DataConfig
from cait.models.build import input_spec
from cait.models.config import CaiTConfig
from cait.models.timm_interop import is_timm
from cait.runtime import Amp, Device
from cait.schema import check_fields, convert_fields, from_dict
from cait.training.losses import DistillKind, SoftNormalisation
from cait.training.preemption import check_signal_names

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "DistillConfig",
    "OptimConfig",
    "PARALLEL_MODES",
    "ParallelMode",
    "Schedule",
    "TrainConfig",
    "WandbMode",
    "apply_overrides",
    "config_from_dict",
    "load_recipe",
    "scaled_lr",
]

# Seconds a collective may wait for the other ranks before the job fails (PyTorch's own
# default is 10 min for NCCL and 30 min for gloo; 10 min covers a slow checkpoint write).
DIST_TIMEOUT_S = 600.0

# The most values a recipe or an override may hold once YAML's aliases are expanded: the
# largest recipe holds about a hundred; an alias bomb ("billion laughs") holds billions, as
# shared references that anything walking the value (a check, a message, a copy) expands.
YAML_MAX_VALUES = 100_000

# Learning rates in the recipes are given for a global batch of 512 and scaled linearly
# (DeiT main.py: ``lr * batch_size * world_size / 512``).
LR_BASE_BATCH = 512

# Closed sets of choices, each defined once: the field annotations below (checked by
# cait.schema) and the CLI's choices read them.
Schedule = Literal["cosine", "step", "constant"]
WandbMode = Literal["offline", "online"]
ParallelMode = Literal["ddp", "fsdp"]
PARALLEL_MODES: tuple[str, ...] = get_args(ParallelMode)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and a cosine (or step) schedule, stepped per iteration.

    ``lr`` is for a global batch of 512 (see :func:`scaled_lr`). Defaults: the DeiT/CaiT
    ImageNet recipe (lr 5e-4, weight decay 0.05, 5 warmup epochs from 1e-6, min lr 1e-5).
    ``layer_decay`` (in (0, 1], off by default as in the CaiT recipes) scales each layer's
    rate by ``layer_decay ** (layers above it)``, the head's by 1 (as in ELECTRA and BEiT).
    """

    lr: float = 5e-4
    scale_lr: bool = True
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Schedule = "cosine"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    decay_epochs: float = 10.0
    decay_rate: float = 0.5
    clip_grad: float | None = None
    accum_steps: int = 1
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.accum_steps < 1:
            raise ValueError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"optim.clip_grad must be positive, got {self.clip_grad}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(
                f"optim.layer_decay must be in (0, 1] (or null), got {self.layer_decay}"
            )


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a frozen teacher (DeiT): ``kind`` none, soft or hard.

    ``teacher`` is ``timm:NAME`` or ``torchvision:NAME`` (with ``teacher_weights``, a local
    file) or one of our checkpoints. The defaults of ``alpha`` and ``tau`` are the CaiT
    recipe's (hard distillation, alpha 0.5, tau 1.0). ``normalisation`` of the soft loss:
    ``per_sample`` (KL summed over classes, averaged over the batch) or ``deit_legacy``
    (DeiT's division by batch x classes).
    """

    kind: DistillKind = "none"
    teacher: str | None = None
    teacher_weights: str | None = None
    alpha: float = 0.5
    tau: float = 1.0
    normalisation: SoftNormalisation = "per_sample"

    def __post_init__(self) -> None:
        check_fields(self, "distill")
        if self.kind != "none" and not self.teacher:
            raise ValueError(f"distill.kind={self.kind} needs a teacher: set distill.teacher")
        if self.kind == "none" and self.teacher:
            raise ValueError(
                f"distill.teacher is set ({self.teacher}) but distill.kind is none: "
                "set distill.kind to soft or hard"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"distill.tau must be positive, got {self.tau}")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. ``model_args`` override fields of the variant's CaiTConfig.

    Under ``torchrun`` the run is data-parallel over all processes: ``parallel: ddp``
    (DistributedDataParallel) or ``fsdp`` (PyTorch's ``fully_shard`` of every block and the
    root, for models whose weights and optimiser state do not fit one device).
    ``dist_timeout`` (seconds) bounds the wait of any collective for the other ranks.
    ``threads`` pins torch's CPU threads; ``null`` follows the cores other processes leave
    free (:mod:`cait.threads`).

    ``resume`` continues a run from its ``last.pt``; ``auto`` continues the output folder's
    run when it has one and starts fresh otherwise. An output folder that holds another run
    is refused unless ``overwrite`` (:mod:`cait.training.run_folder`).
    ``checkpoint_every_steps`` also writes ``last.pt`` within epochs, every that many
    optimiser steps (resuming from it is exact); ``preempt_signals`` make the run finish its
    step, write ``last.pt`` and stop (:mod:`cait.training.preemption`).
    """

    model: str = "cait_digits_16"
    model_args: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/train"
    epochs: int = 100
    seed: int = 0
    device: Device = "auto"
    amp: Amp = "none"
    grad_checkpointing: bool = False
    ema: bool = True
    ema_decay: float = 0.99996
    init_from: str | None = None
    resume: str | None = None
    overwrite: bool = False
    checkpoint_every_steps: int | None = None
    preempt_signals: tuple[str, ...] = ("SIGTERM",)
    stop_after: int | None = None
    log_interval: int = 20
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "cait"
    wandb_mode: WandbMode = "offline"
    threads: int | None = None
    parallel: ParallelMode = "ddp"
    dist_timeout: float = DIST_TIMEOUT_S
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        check_fields(self)  # types and choices; the sections checked themselves
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(
                f"checkpoint_every_steps must be >= 1 (or null: at the end of epochs only), "
                f"got {self.checkpoint_every_steps}"
            )
        check_signal_names(self.preempt_signals)
        if self.log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {self.log_interval}")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be positive, got {self.dist_timeout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"threads must be >= 1 (or null to follow the load), got {self.threads}"
            )
        if self.parallel == "fsdp" and self.ema:
            raise ValueError(
                "parallel=fsdp does not keep an EMA (it would hold the full weights on every "
                "rank): set ema=false"
            )
        if self.parallel == "fsdp" and self.amp == "fp16":
            raise ValueError("parallel=fsdp supports amp none or bf16, not fp16 loss scaling")
        if self.augment.mixes and self.data.batch_size % 2:
            raise ValueError(
                f"mixup/cutmix pair samples within a batch: data.batch_size must be even, "
                f"got {self.data.batch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scaled_lr(config: TrainConfig, world_size: int = 1) -> float:
    """Peak learning rate: ``optim.lr * global_batch / 512`` unless scaling is off; the
    global batch is ``batch_size x accum_steps x world_size``."""
    if not config.optim.scale_lr:
        return config.optim.lr
    global_batch = config.data.batch_size * config.optim.accum_steps * world_size
    return config.optim.lr * global_batch / LR_BASE_BATCH


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a plain (YAML or checkpoint) dict.

    ``model_args`` are typed against :class:`~cait.models.config.CaiTConfig` and applied to the
    variant here, so an unknown model or a bad model field fails before anything runs.
    """
    config = from_dict(TrainConfig, data)
    if not is_timm(config.model):
        model_args = convert_fields(CaiTConfig, config.model_args, "model_args")
        config = dataclasses.replace(config, model_args=model_args)
    input_spec(config.model, config.model_args)  # unknown model or bad model_args
    return config


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe as a plain dict (validated when the config is built)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = _load_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of config keys, got {type(data)}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a config dict (values parsed as YAML)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"an override expects key=value, got {item!r}")
        value = _load_yaml(raw, f"override {key}") if raw else None
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {key}: {part!r} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def _load_yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML (safe types only), refused when expanding its aliases gives
    more than :data:`YAML_MAX_VALUES` values."""
    data = yaml.safe_load(text)
    # each container counted every time it is reached: an alias is walked as often as it
    # is used, which is what expanding it costs
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > YAML_MAX_VALUES:
            raise ValueError(
                f"{what} holds more than {YAML_MAX_VALUES:,} values after expanding YAML aliases"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple | set):
            stack.extend(value)
    return data
