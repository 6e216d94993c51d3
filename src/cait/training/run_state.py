"""The run state in a run checkpoint, typed: what
:func:`cait.training.checkpoint.load_checkpoint` checks before anything trains (a file from
elsewhere, or one edited by hand, is data).

Every field of :data:`cait.training.checkpoint.RUN_FIELDS` present and of its type (read
from the annotations of :class:`RunState` by :mod:`cait.schema`, as the config's are), the
numbers in their ranges (the epoch within the run's epochs, the step counted from 0, the
best top-1 a percentage), the config one that builds, and the RNG states of the form
:func:`cait.runtime.get_rng_state` gives. What needs the run being resumed (the EMA's names
against the model's) is checked when it resumes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cait import schema
from cait.training.config import config_from_dict
from cait.training.engine import EpochPosition

__all__ = ["MAX_STEPS", "RunSchedule", "RunState", "check_run_state"]

# The largest optimiser step a checkpoint may hold: a billion, some 2,000 times a 400-epoch
# ImageNet run (1,251 steps an epoch at a global batch of 1,024).
MAX_STEPS = 10**9


@dataclass(frozen=True)
class RunSchedule:
    """The schedule's clock in a run checkpoint: the optimiser step, the peak learning rate
    and the steps per epoch it was computed with, and the number of processes."""

    step: int
    peak_lr: float
    steps_per_epoch: int
    world_size: int

    def __post_init__(self) -> None:
        schema.check_fields(self, "schedule")
        _in_range("schedule.step", self.step, 0, MAX_STEPS)
        _in_range("schedule.peak_lr", self.peak_lr, 0.0, None)
        _in_range("schedule.steps_per_epoch", self.steps_per_epoch, 1, MAX_STEPS)
        _in_range("schedule.world_size", self.world_size, 1, None)


@dataclass(frozen=True)
class RunState:
    """A run checkpoint's run state (``RUN_FIELDS``), typed, to check one read from a file
    before anything trains: every field present and of its type, the numbers in their
    ranges (the epoch within the run's epochs, the step counted from 0) and the RNG states
    of the form :func:`cait.runtime.get_rng_state` gives."""

    optimizer: dict[str, Any]
    schedule: RunSchedule
    scaler: dict[str, Any] | None
    ema: dict[str, Any] | None
    rng: dict[str, Any]
    epoch: int  # the last epoch done, 0-based: -1 within the first
    step: int
    history: tuple[dict[str, Any], ...]
    best_top1: float
    config: dict[str, Any]
    rng_ranks: tuple[dict[str, Any], ...] | None = None  # absent in the oldest files
    epoch_position: tuple[EpochPosition, ...] | None = None

    def __post_init__(self) -> None:
        schema.check_fields(self)
        try:
            epochs = config_from_dict(self.config).epochs
        except ValueError as err:
            raise ValueError(f"config: {err}") from None
        _in_range("epoch", self.epoch, -1, epochs - 1)
        _in_range("step", self.step, 0, MAX_STEPS)
        if self.schedule.step != self.step:
            raise ValueError(f"schedule.step {self.schedule.step} is not step {self.step}")
        _in_range("best_top1", self.best_top1, -1.0, 100.0)
        _check_history(self.history, self.epoch + 1)
        _check_optimizer(self.optimizer)
        if self.ema is not None:
            _check_tensors(self.ema, "ema")
        for i, rng in enumerate([self.rng, *(self.rng_ranks or ())]):
            _check_rng(rng, "rng" if i == 0 else f"rng_ranks[{i - 1}]")


def check_run_state(run: dict[str, Any], path: str | Path) -> RunState:
    """``run`` (a run checkpoint's state, read from ``path``) as a :class:`RunState`, or a
    one-line ``ValueError`` naming ``path`` and the first field that is wrong."""
    try:
        schema.reject_unknown(RunState, run, what="run fields")
        return schema.from_dict(RunState, run)
    except ValueError as err:
        raise ValueError(f"{path} is a malformed run checkpoint: {err}") from None


def _in_range(where: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{where} must be {bounds}, got {schema.shown(value)}")


def _check_history(history: tuple[dict[str, Any], ...], epochs_done: int) -> None:
    """One row per epoch done, each mapping names to numbers (or strings)."""
    if len(history) > epochs_done:
        raise ValueError(f"history has {len(history)} rows for {epochs_done} epoch(s) done")
    for i, row in enumerate(history):
        for key, value in row.items():
            if not isinstance(key, str) or not isinstance(value, int | float | str | None):
                raise ValueError(
                    f"history[{i}] must map names to numbers, got {schema.shown(key)}: "
                    f"{schema.shown(value)}"
                )


def _check_optimizer(state: dict[str, Any]) -> None:
    """A plain optimiser state: per-parameter state by index, and parameter groups."""
    groups = state.get("param_groups")
    if not isinstance(state.get("state"), dict) or not isinstance(groups, list):
        raise ValueError(
            f"optimizer must hold 'state' and 'param_groups', got {schema.shown(state)}"
        )
    for i, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise ValueError(
                f"optimizer.param_groups[{i}] must be a mapping with 'params' (integers), "
                f"got {schema.shown(group)}"
            )


def _check_tensors(state: dict[str, Any], where: str) -> None:
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(
                f"{where} must map names to tensors, got {schema.shown(key)}: {schema.shown(value)}"
            )


def _check_rng(state: Any, where: str) -> None:
    """``state`` must be of the form :func:`cait.runtime.get_rng_state` gives: each part is
    set on a generator of its own (the process's own streams are left as they are)."""
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a mapping, got {schema.shown(state)}")
    missing = sorted({"python", "numpy", "torch"} - state.keys())
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.RandomState().set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
        torch.Generator().set_state(state["torch"])
        for cuda in state.get("cuda") or []:
            if not (isinstance(cuda, Tensor) and cuda.dtype == torch.uint8):
                raise TypeError(f"a CUDA generator's state is a byte tensor, not {type(cuda)}")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where} is not an RNG state ({schema.shown(reason)})") from None
