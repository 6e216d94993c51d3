"""One training epoch and one evaluation pass, separate from the run's set-up."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cait import schema
from cait.progress import progress_bar
from cait.runtime import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    autocast,
    dist_info,
    get_rng_state,
    set_rng_state,
)
from cait.threads import adapt as adapt_threads
from cait.training.losses import DistillationLoss
from cait.training.optim import Optimisation

__all__ = [
    "EpochPosition",
    "EpochStats",
    "NonFiniteLossError",
    "Objective",
    "evaluate",
    "train_one_epoch",
]


logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    """One epoch over all ranks. ``seconds`` is the whole epoch; ``images_per_s`` leaves out
    this process's first optimiser step (warm-up: the C++ kernel's load or build,
    allocations; in an epoch resumed from within, also the batches drawn again), counting
    the images after it over the time after it, when the process took more than one step."""

    loss: float
    lr: float
    images: int
    seconds: float
    steps: int
    skipped: list[str] = field(default_factory=list)
    timed_images: int | None = None  # after the warm-up step; None: no step after it
    timed_seconds: float = 0.0
    data_wait: float = 0.0  # seconds this process waited for the loader's batches

    @property
    def data_wait_share(self) -> float:
        """The share of the epoch spent waiting for data (this process's)."""
        return min(1.0, self.data_wait / self.seconds) if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        images, seconds = self.images, self.seconds
        if self.timed_images is not None:
            images, seconds = self.timed_images, self.timed_seconds
        return images / seconds if seconds > 0 else 0.0


def _check_finite(value: float, epoch: int, step: int) -> None:
    """``epoch`` is 0-based here and reported 1-based, as in the logs and metrics."""
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} in epoch {epoch + 1} (detected by optimiser step "
            f"{step}; the loss is checked every log_interval steps); stopping. The last "
            "checkpoint, written before this epoch, is intact. Lower the learning rate, "
            "enable gradient clipping (optim.clip_grad) or use bf16 instead of fp16."
        )


@dataclass
class Objective:
    """What a training step minimises: ``criterion`` (plain cross-entropy by default) on the
    batch as ``mixup`` mixes it, with ``teacher``'s logits on the same mixed images feeding
    the distillation term."""

    criterion: DistillationLoss = field(default_factory=lambda: DistillationLoss("none"))
    mixup: Callable | None = None
    teacher: nn.Module | None = None


@dataclass
class EpochPosition:
    """Where one rank stands within an epoch, for a checkpoint written mid-epoch: the
    loader's batches consumed, this rank's running sums, and every RNG's state when the
    epoch's loader was started.

    Resuming from it restores the RNGs of the epoch's start, starts the loader (the same
    shuffled order, the same seeds for its worker processes), draws and discards the
    batches already trained on, then takes back the RNGs of the checkpoint: the batches
    that follow are the ones the uninterrupted run trained on, augmentations included.
    """

    batches: int
    micro: int
    loss_sum: float
    images: int
    seconds: float
    skipped: tuple[str, ...]
    rng_at_start: dict[str, Any]  # runtime.get_rng_state()

    def __post_init__(self) -> None:
        schema.check_fields(self, "epoch_position")
        # checked whole when set (set_rng_state); here, so a checkpoint is refused on load
        missing = {"python", "numpy", "torch"} - self.rng_at_start.keys()
        if missing:
            raise ValueError(f"epoch_position.rng_at_start lacks {sorted(missing)}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Any) -> EpochPosition:
        """From a checkpoint: unknown or missing keys and mistyped fields raise."""
        return schema.from_dict(cls, data, "epoch_position")


@dataclass
class _Tally:
    """This rank's running sums over one epoch. The loss stays on the device (read back only
    at log points, so the loop does not wait on the device at every step)."""

    loss_sum: torch.Tensor
    images: int = 0
    micro: int = 0  # micro-batches done
    batches: int = 0  # batches drawn from the loader (empty ones too)
    earlier_seconds: float = 0.0  # of the epoch's part before a mid-epoch resume
    skipped: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    warm: float | None = None  # when the first optimiser step (the warm-up) ended
    warm_images: int = 0  # this rank's images up to then
    waited: float = 0.0  # seconds spent waiting for the loader's next batch

    def mean_loss(self) -> float:
        """The mean loss over all ranks (a collective)."""
        return _global_mean(self.loss_sum, max(1, self.micro))

    def end_warm_up(self, device: torch.device) -> None:
        _synchronize(device)
        self.warm, self.warm_images = time.perf_counter(), self.images

    def rate(self) -> float:
        """All ranks' images per second since the warm-up (since the start before it ends)."""
        start, images = (self.start, 0) if self.warm is None else (self.warm, self.warm_images)
        seconds = time.perf_counter() - start
        return (self.images - images) * dist_info().world_size / seconds if seconds > 0 else 0.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    opt: Optimisation,
    step: int,
    epoch: int,
    device: torch.device,
    *,
    objective: Objective | None = None,
    amp: str = "none",
    log_interval: int = 20,
    progress: bool = True,
    description: str = "",
    on_log: Callable[[int, float, float], None] | None = None,
    position: EpochPosition | None = None,
    after_step: Callable[[int, Callable[[], EpochPosition]], None] | None = None,
) -> tuple[EpochStats, int]:
    """Train for one pass over ``loader``; returns the epoch's stats and the new step.

    ``step`` counts optimiser steps (the schedule's clock); one is taken every
    ``opt.accum_steps`` batches. The loss is read back only every ``log_interval`` steps,
    where ``on_log(step, loss, lr)`` is called; the NaN/inf check runs at those points and
    at the end.

    Under ``torchrun`` every rank runs this on its shard of the data with the same number of
    batches. The loss is averaged over all ranks where it is read back (the ranks' batches
    are equal, so this is the loss of the global batch), so all ranks see the same value and
    a NaN on any one of them stops every rank at the same step instead of leaving the others
    waiting. ``images`` in the stats counts all ranks' images.

    ``position`` continues an epoch from a checkpoint written within it
    (:class:`EpochPosition`). ``after_step(step, position)`` is called after every
    optimiser step but the epoch's last; ``position()`` gives where the epoch stands, for a
    checkpoint (the caller may raise to stop the run there).
    """
    model.train()
    objective = objective if objective is not None else Objective()
    total = len(loader) // opt.accum_steps  # type: ignore[arg-type]
    tally = _Tally(torch.zeros((), device=device))
    position = _usable(position, len(loader), opt.accum_steps, epoch)  # type: ignore[arg-type]
    batches, rng_at_start = _start_epoch(loader, position, tally)
    first = tally.micro // opt.accum_steps  # steps an earlier process did (a resumed epoch)
    lr = opt.schedule(step)
    opt.optimizer.zero_grad(set_to_none=True)
    with progress_bar(total, description, progress) as bar:
        bar.update(tally.micro // opt.accum_steps)
        for x, target, bad in _waiting(batches, tally):
            tally.batches += 1
            tally.skipped += bad
            if x.numel() == 0:
                continue
            x = x.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            last_micro = (tally.micro + 1) % opt.accum_steps == 0
            tally.loss_sum += _forward_backward(model, x, target, objective, opt, amp, last_micro)
            tally.images += x.shape[0]
            tally.micro += 1
            if tally.micro % opt.accum_steps:
                continue
            lr = opt.step(model, step)
            step += 1
            adapt_threads()  # the thread count for the next step, after other processes' load
            done = tally.micro // opt.accum_steps
            if done == first + 1:  # this process's first step: its warm-up
                tally.end_warm_up(device)
            bar.update(1)
            if done % log_interval == 0 or done == total:
                mean_loss = tally.mean_loss()
                _check_finite(mean_loss, epoch, step)
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{tally.rate():.0f}"
                )
                if on_log is not None:
                    on_log(step, mean_loss, lr)
            if done == total:
                break
            if after_step is not None:
                after_step(step, lambda: _position(tally, rng_at_start))
    return _epoch_stats(tally, lr, opt.accum_steps, epoch, step), step


def _waiting(batches: Iterator, tally: _Tally) -> Iterator:
    """``batches``, adding the time spent waiting for each to ``tally.waited``."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        tally.waited += time.perf_counter() - start
        yield batch


def _start_epoch(
    loader: Iterable, position: EpochPosition | None, tally: _Tally
) -> tuple[Iterator, dict]:
    """The epoch's batches from where ``position`` stands (from the start without one),
    and the RNG states the epoch's loader started from."""
    if position is None:
        rng_at_start = get_rng_state()
        return iter(loader), rng_at_start
    resumed = get_rng_state()  # the checkpoint's
    set_rng_state(position.rng_at_start)
    batches = iter(loader)  # the same order and worker seeds as the interrupted epoch's
    for _ in range(position.batches):
        next(batches)  # drawn again, with the same random augmentations, and discarded
    set_rng_state(resumed)
    tally.loss_sum += position.loss_sum
    tally.images, tally.micro, tally.batches = position.images, position.micro, position.batches
    tally.skipped = list(position.skipped)
    tally.earlier_seconds = position.seconds
    return batches, position.rng_at_start


def _usable(
    position: EpochPosition | None, batches: int, accum_steps: int, epoch: int
) -> EpochPosition | None:
    """``position`` when it can be a place in an epoch of ``batches`` batches; None, with a
    warning, when it cannot (the data, batch size or accumulation changed since the
    checkpoint): the epoch then starts over."""
    if position is None or (
        0 <= position.micro <= position.batches < batches
        and position.micro % accum_steps == 0
        and position.images >= 0
    ):
        return position
    logger.warning(
        "the checkpoint's place within epoch %d (%d batches drawn) does not fit this "
        "run's %d batches of %d steps each: the epoch starts over from its first batch",
        epoch + 1,
        position.batches,
        batches,
        accum_steps,
    )
    return None


def _position(tally: _Tally, rng_at_start: dict) -> EpochPosition:
    return EpochPosition(
        batches=tally.batches,
        micro=tally.micro,
        loss_sum=tally.loss_sum.item(),
        images=tally.images,
        seconds=tally.earlier_seconds + time.perf_counter() - tally.start,
        skipped=tuple(tally.skipped),
        rng_at_start=rng_at_start,
    )


def _forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    objective: Objective,
    opt: Optimisation,
    amp: str,
    last_micro: bool,
) -> torch.Tensor:
    """One micro-batch (on the device): mix, forward the student and the teacher, backward.
    Returns the micro-batch's loss, detached; the mixed batch keeps its size."""
    if objective.mixup is not None:
        x, target = objective.mixup(x, target)
    # DDP all-reduces gradients in every backward; between optimiser steps that is wasted
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    with contextlib.nullcontext() if last_micro else no_sync():
        with autocast(x.device, amp):
            outputs = model(x)
            teacher_logits = objective.teacher(x) if objective.teacher is not None else None
        out = objective.criterion(outputs, target, teacher_logits)
        opt.backward(out.loss)
    return out.loss.detach()


def _epoch_stats(tally: _Tally, lr: float, accum_steps: int, epoch: int, step: int) -> EpochStats:
    """The epoch's stats over all ranks (collectives); a non-finite loss raises."""
    end = time.perf_counter()
    seconds = tally.earlier_seconds + end - tally.start
    mean_loss = tally.mean_loss()
    _check_finite(mean_loss, epoch, step)
    images = tally.images * dist_info().world_size  # every rank ran the same equal batches
    skipped = [s for rank in all_gather_objects(tally.skipped) for s in rank]
    steps = tally.micro // accum_steps
    stats = EpochStats(mean_loss, lr, images, seconds, steps, skipped, data_wait=tally.waited)
    if tally.warm is not None and tally.images > tally.warm_images:  # steps after the warm-up
        stats.timed_images = (tally.images - tally.warm_images) * dist_info().world_size
        stats.timed_seconds = end - tally.warm
    return stats


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _global_mean(loss_sum: torch.Tensor, count: int) -> float:
    """The mean over all ranks of ``loss_sum / count`` (every rank has the same count)."""
    total = all_reduce_sum(loss_sum.detach().clone().double())
    return total.item() / (count * dist_info().world_size)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: str = "none",
    progress: bool = False,
    description: str = "eval",
) -> dict:
    """Top-1, top-5 (or top-k for fewer classes), mean loss, image count and images/s on
    ``loader``.

    ``images_per_s`` leaves out the first batch, the warm-up (the C++ kernel's load, or its
    build on a machine's first run, and the first allocations): it counts the images after
    the first batch over the time from its end. With a single batch it is that batch's rate,
    warm-up included.

    Under ``torchrun`` each rank evaluates its own shard (``ShardSampler``: no padding, no
    image twice) and the sums of losses, hits and images are added over the ranks, so the
    result is the single-process one. Every rank runs as many forward passes as the rank
    with the most batches (one with fewer repeats its last batch and discards the result),
    because an FSDP model gathers its weights from all ranks in each forward pass.
    """
    model.eval()
    # loss sum, top-1 hits, top-5 hits, images: float64 holds the counts exactly
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    skipped: list[str] = []
    start, warm, warm_images = time.perf_counter(), None, 0.0
    # agreed before the first forward pass: a collective between two forward passes of an
    # FSDP model would be matched with the other ranks' weight gathers and hang
    most = _most_batches(loader, device)
    passes, last = 0, None
    total = len(loader) if hasattr(loader, "__len__") else None
    with progress_bar(total, description, progress) as bar:
        for x, target, bad in loader:
            bar.update(1)
            adapt_threads()
            skipped += bad
            if x.numel() == 0:
                continue
            x = last = x.to(device, non_blocking=True)
            passes += 1
            target = target.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            if isinstance(logits, tuple):  # a distilled model left in training mode
                logits = (logits[0] + logits[1]) / 2
            sums += _batch_sums(logits.float(), target)
            if passes == 1:  # the warm-up batch: the timed figure starts after it
                _synchronize(device)
                warm, warm_images = time.perf_counter(), float(x.shape[0])
    if passes < most and last is None:
        raise ValueError("this rank has no readable evaluation batch to keep step with")
    for _ in range(most - passes):  # results discarded
        with autocast(device, amp):
            model(last)
    _synchronize(device)
    end = time.perf_counter()
    # with the warm-up images of every rank, and how many ranks timed more than their first
    timed = torch.tensor([warm_images, float(passes > 1)], device=device, dtype=torch.float64)
    totals = all_reduce_sum(torch.cat([sums, timed]))
    skipped = [s for rank in all_gather_objects(skipped) for s in rank]
    loss_sum, correct1, correct5, images, warm_images_all, ranks_timed = totals.tolist()
    images = int(images)
    n = max(1, images)
    seconds = end - start
    if warm is not None and ranks_timed > 0:  # steady state: after every rank's first batch
        images_timed, seconds = images - warm_images_all, end - warm
    else:
        images_timed = images
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "images": images,
        "images_per_s": images_timed / seconds if seconds > 0 else 0.0,
        "skipped": skipped,
    }


def _batch_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A batch's loss sum, top-1 hits, top-5 hits (top-k for fewer classes) and images,
    in float64."""
    k = min(5, logits.shape[-1])
    hits = logits.topk(k, dim=-1).indices == target[:, None]
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    images = torch.tensor(float(len(target)), device=logits.device)
    return torch.stack([loss, hits[:, 0].sum(), hits.any(dim=-1).sum(), images]).double()


def _most_batches(loader: Iterable, device: torch.device) -> int:
    """The largest number of batches any rank's ``loader`` has (0 on one process)."""
    if dist_info().world_size == 1:
        return 0
    return int(all_reduce_max(torch.tensor(len(loader), device=device)).item())
