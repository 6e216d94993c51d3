"""The run checkpoint: what ``last.pt`` / ``best.pt`` hold for training, how they are written
(atomically) and read, how a resume is checked against them and takes its state back, and
where a run's weights files go.

The file itself (the weights, the model's metadata, the encoding of ``.pt`` and
``.safetensors``, the layout of older files) is :mod:`cait.models.weights_file`'s. This
module owns the run's state, which the file keeps under an entry of its own: the plain
(unwrapped) state dicts of the optimiser, the fp16 scaler and the EMA; the schedule's clock;
every rank's RNG streams; the epoch (and the position within it), step, metrics history and
best top-1; and the run's config as a dict (:data:`RUN_FIELDS`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cait import runtime
from cait.data.classes import check_class_names
from cait.models.weights_file import (
    class_names_of,
    describe_spec,
    read_weights_file,
    save_pt,
    save_safetensors,
    spec_of,
)
from cait.schema import shown
from cait.training.config import TrainConfig
from cait.training.engine import EpochPosition
from cait.training.optim import ModelEma, Optimisation
from cait.training.parallel import load_optimizer_state, model_state_dict, optimizer_state_dict
from cait.training.run_state import check_run_state

__all__ = [
    "BEST",
    "EMA_WEIGHTS",
    "LAST",
    "RESUME_FREE",
    "RUN_FIELDS",
    "WEIGHTS",
    "RunCheckpoint",
    "RunProgress",
    "check_resume",
    "load_checkpoint",
    "restore_rng",
    "resume_run",
    "run_state",
    "save_checkpoint",
    "save_run_checkpoint",
    "save_run_weights",
    "warn_on_changed_settings",
]

logger = logging.getLogger(__name__)

# The files of a run's output folder: the checkpoint after the latest epoch and after the
# best one (by val top-1), and the weights (and EMA weights) at the end of the run.
LAST = "last.pt"
BEST = "best.pt"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"

# The run's state in a run checkpoint, in the order it is written.
RUN_FIELDS = (
    "optimizer",
    "schedule",
    "scaler",
    "ema",
    "rng",
    "rng_ranks",  # every rank's RNG streams (rank 0's is "rng")
    "epoch",
    "epoch_position",  # where each rank stands, in a checkpoint written within an epoch
    "step",
    "history",
    "best_top1",
    "config",
)

# Settings that may change on resume without changing what is computed.
RESUME_FREE = frozenset(
    {
        "resume",
        "overwrite",
        "checkpoint_every_steps",
        "preempt_signals",
        "stop_after",
        "output",
        "progress",
        "tensorboard",
        "wandb",
        "wandb_project",
        "wandb_mode",
        "threads",
        "log_interval",
        "data.workers",
        "dist_timeout",
        "parallel",  # DDP and FSDP compute the same steps (up to float rounding)
        "data.classes_by_position",  # what check_resume accepts, not what is computed
    }
)


@dataclass
class RunProgress:
    """Where a run stands: the first epoch still to train (0-based), the optimiser step
    (the schedule's clock), the metrics of the epochs done and the best val top-1."""

    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_top1: float = -1.0
    # where this rank stands in ``start_epoch`` when the run resumes within it
    position: EpochPosition | None = None


@dataclass
class RunCheckpoint:
    """A run checkpoint: the model's weights and metadata
    (:func:`cait.models.weights_file.checkpoint_metadata`), and the run's state
    (:data:`RUN_FIELDS`)."""

    weights: dict[str, Tensor]
    metadata: dict[str, Any]
    run: dict[str, Any]


def run_state(
    model: nn.Module,
    opt: Optimisation,
    progress: RunProgress,
    epoch: int,
    config: TrainConfig,
    metadata: dict[str, Any],
    position: EpochPosition | None = None,
) -> RunCheckpoint:
    """The run checkpoint after ``epoch`` (0-based), ``progress`` already counting it; with
    ``position``, within the epoch after it (``epoch_position`` holds every rank's).

    ``metadata`` describes the model (:func:`cait.models.weights_file.checkpoint_metadata`).
    Under ``torchrun`` this is a collective (gathering the sharded state and the ranks' RNG
    states): every rank calls it; under FSDP only rank 0's holds the weights.
    """
    model_state = model_state_dict(model)
    optim_state = optimizer_state_dict(model, opt.optimizer)
    rng_ranks = runtime.all_gather_objects(runtime.get_rng_state())
    world_size = len(rng_ranks)
    positions = None
    if position is not None:
        positions = runtime.all_gather_objects(position.to_dict())
    run = {
        "optimizer": optim_state,
        "schedule": {
            "step": progress.step,
            "peak_lr": opt.schedule.peak_lr,
            "steps_per_epoch": opt.schedule.steps_per_epoch,
            "world_size": world_size,
        },
        "scaler": opt.scaler.state_dict() if opt.scaler is not None else None,
        "ema": opt.ema.state_dict() if opt.ema is not None else None,
        "rng": rng_ranks[0],
        # so that a resumed run draws the same augmentations on every rank
        "rng_ranks": rng_ranks if world_size > 1 else None,
        "epoch": epoch,
        "epoch_position": positions,
        "step": progress.step,
        "history": progress.history,
        "best_top1": progress.best_top1,
        "config": config.to_dict(),
    }
    return RunCheckpoint(model_state, metadata, run)


def save_checkpoint(checkpoint: RunCheckpoint, path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` via a temporary file and an atomic rename, so that a
    process killed mid-write leaves the previous file intact."""
    save_pt(checkpoint.weights, path, checkpoint.metadata, checkpoint.run)


def load_checkpoint(path: str | Path) -> RunCheckpoint:
    """A run checkpoint as saved by :func:`save_checkpoint`, or as older versions wrote it
    (tensors and plain data only; the metadata and the run state checked:
    :func:`cait.training.run_state.check_run_state`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        raise ValueError(
            f"{path} holds weights only; resuming needs a training checkpoint (last.pt)"
        )
    file = read_weights_file(path)
    if file.metadata is None or not isinstance(file.run, dict) or "config" not in file.run:
        raise ValueError(f"{path} is not a cait training checkpoint (no 'model'/'config' entries)")
    check_run_state(file.run, path)
    return RunCheckpoint(file.weights(), file.metadata.entries, file.run)


def save_run_checkpoint(checkpoint: RunCheckpoint, out: Path, is_best: bool) -> None:
    """``last.pt``, and ``best.pt`` too when the epoch is the best so far."""
    save_checkpoint(checkpoint, out / LAST)
    if is_best:
        save_checkpoint(checkpoint, out / BEST)


def save_run_weights(
    model: nn.Module, ema: ModelEma | None, out: Path, metadata: dict[str, Any], write: bool
) -> None:
    """``model.safetensors`` (and ``model_ema.safetensors`` with an EMA), with ``metadata``
    (:func:`cait.models.weights_file.checkpoint_metadata`). Under FSDP gathering the weights
    is a collective: every rank calls this, and only the one with ``write`` set writes."""
    weights = model_state_dict(model)
    if write:
        save_safetensors(weights, out / WEIGHTS, metadata)
        if ema is not None:
            save_safetensors(ema.state_dict(), out / EMA_WEIGHTS, metadata)


def check_resume(
    checkpoint: RunCheckpoint,
    spec: dict[str, Any],
    path: str | Path,
    classes: Sequence[str] | None = None,
    by_position: bool = False,
) -> None:
    """Refuse a checkpoint of another model than ``spec``
    (:func:`cait.models.weights_file.model_spec`) describes, and one whose class names
    differ from the data's ``classes`` (a renamed class folder would shift every label);
    ``by_position`` takes the latter with a warning (:mod:`cait.data.classes`)."""
    theirs = spec_of(checkpoint.metadata)
    if theirs != spec_of(spec):
        raise ValueError(
            f"resume={path} holds a checkpoint of another model:\n"
            f"  checkpoint: {describe_spec(theirs)}\n  this run:   {describe_spec(spec)}"
        )
    if classes is not None:
        names = class_names_of(checkpoint.metadata)
        labels = ("the checkpoint", "the data")
        check_class_names(names, classes, labels, f"resume={path}", by_position)


def resume_run(
    checkpoint: RunCheckpoint,
    model: nn.Module,
    opt: Optimisation,
    config: TrainConfig,
    info: runtime.DistInfo,
) -> RunProgress:
    """Take back a run's state from its checkpoint: the optimiser, scaler and EMA, this
    rank's RNG streams, and where the run stands (the model's weights are loaded before it
    is wrapped). Settings that make the run differ from an uninterrupted one are warned of.
    """
    state = checkpoint.run
    warn_on_changed_settings(checkpoint, config, opt.schedule.steps_per_epoch, info.world_size)
    load_optimizer_state(model, opt.optimizer, state["optimizer"])
    if opt.scaler is not None and state.get("scaler"):
        opt.scaler.load_state_dict(state["scaler"])
    if opt.ema is not None and state.get("ema") is not None:
        _check_ema(state["ema"], opt.ema.state_dict(), config.resume)
        opt.ema.load_state_dict(state["ema"])
    progress = RunProgress(
        start_epoch=state["epoch"] + 1,
        step=state["step"],
        history=list(state["history"]),
        best_top1=state["best_top1"],
        position=_epoch_position(state, info),
    )
    restore_rng(checkpoint, info)
    return progress


def _check_ema(saved: dict[str, Tensor], ours: dict[str, Tensor], path: str | None) -> None:
    """The checkpoint's EMA weights must be this model's: the same names and shapes."""
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the checkpoint's ema is not this model's (missing {shown(missing)}, "
            f"unexpected {shown(unexpected)})"
        )
    for name, value in ours.items():
        if saved[name].shape != value.shape:
            raise ValueError(
                f"{path}: the checkpoint's ema.{name} has shape {tuple(saved[name].shape)}, "
                f"this model's {tuple(value.shape)}"
            )


def _epoch_position(state: dict[str, Any], info: runtime.DistInfo) -> EpochPosition | None:
    """This rank's position within the epoch a checkpoint was written in (None for one
    written at the end of an epoch). Another number of processes cannot continue the
    epoch's shards: it starts the epoch over."""
    positions = state.get("epoch_position")
    if not positions:
        return None
    if not isinstance(positions, list):
        raise ValueError("the checkpoint's epoch_position is malformed (not a list)")
    if len(positions) != info.world_size:
        logger.warning(
            "the checkpoint was written within epoch %d by %d process(es); on %d the epoch "
            "starts over from its first batch",
            state["epoch"] + 2,
            len(positions),
            info.world_size,
        )
        return None
    try:
        return EpochPosition.from_dict(positions[info.rank])
    except (TypeError, ValueError) as err:  # missing fields; mistyped or unknown ones
        raise ValueError(f"the checkpoint's epoch_position is malformed ({err})") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_args":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def warn_on_changed_settings(
    checkpoint: RunCheckpoint, config: TrainConfig, steps_per_epoch: int, world_size: int
) -> None:
    """Resume continues exactly only with the same settings; say which ones changed."""
    state = checkpoint.run
    saved = _flatten(state["config"])
    now = _flatten(config.to_dict())
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUME_FREE and _plain(saved.get(k)) != _plain(now.get(k))
    )
    if changed:
        logger.warning(
            "resuming with changed settings, so the run will not match an uninterrupted one: %s",
            ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed),
        )
    sched = state.get("schedule", {})
    saved_world = sched.get("world_size", 1)
    if saved_world != world_size:
        logger.warning(
            "resuming a run of %d process(es) on %d: the global batch and the order of "
            "the images change, so the run will not match an uninterrupted one",
            saved_world,
            world_size,
        )
    if sched.get("steps_per_epoch") not in (None, steps_per_epoch):
        logger.warning(
            "steps per epoch changed from %s to %d: the schedule's clock shifts",
            sched["steps_per_epoch"],
            steps_per_epoch,
        )


def restore_rng(checkpoint: RunCheckpoint, info: runtime.DistInfo) -> None:
    """Each rank takes back its own RNG streams; from a checkpoint of another number of
    processes only rank 0 can (the others keep the streams seeded for them)."""
    state = checkpoint.run
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == info.world_size:
        runtime.set_rng_state(ranks[info.rank])
    elif info.is_main:
        runtime.set_rng_state(state["rng"])
