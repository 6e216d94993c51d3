"""One training epoch and one evaluation pass, separate from the run's set-up."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from cait.runtime import all_gather_objects, all_reduce_max, all_reduce_sum, autocast, dist_info
from cait.training.losses import DistillationLoss
from cait.training.optim import LRSchedule, ModelEma

__all__ = ["EpochStats", "NonFiniteLossError", "evaluate", "train_one_epoch"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    loss: float
    lr: float
    images: int
    seconds: float
    steps: int
    skipped: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _check_finite(value: float, epoch: int, step: int) -> None:
    """``epoch`` is 0-based here and reported 1-based, as in the logs and metrics."""
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} in epoch {epoch + 1} (detected by optimiser step "
            f"{step}; the loss is checked every log_interval steps); stopping. The last "
            "checkpoint, written before this epoch, is intact. Lower the learning rate, "
            "enable gradient clipping (optim.clip_grad) or use bf16 instead of fp16."
        )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    step: int,
    epoch: int,
    device: torch.device,
    *,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    mixup: Callable | None = None,
    criterion: DistillationLoss | None = None,
    teacher: nn.Module | None = None,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    ema: ModelEma | None = None,
    log_interval: int = 20,
    progress: bool = True,
    description: str = "",
    on_log: Callable[[int, float, float], None] | None = None,
) -> tuple[EpochStats, int]:
    """Train for one pass over ``loader``; returns the epoch's stats and the new step.

    ``step`` counts optimiser steps (the schedule's clock). ``criterion`` defaults to plain
    cross-entropy; with a ``teacher``, its logits on the same (mixed) images feed the
    distillation term. The loss is accumulated on the
    device and read back only every ``log_interval`` steps, so the loop does not wait on
    the device at every step; the NaN/inf check runs at those points and at the end.

    Under ``torchrun`` every rank runs this on its shard of the data with the same number of
    batches. The loss is averaged over all ranks where it is read back (the ranks' batches
    are equal, so this is the loss of the global batch), so all ranks see the same value and
    a NaN on any one of them stops every rank at the same step instead of leaving the others
    waiting. ``images`` in the stats counts all ranks' images.
    """
    model.train()
    criterion = criterion if criterion is not None else DistillationLoss("none")
    total = len(loader) // accum_steps  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    images = 0
    skipped: list[str] = []
    micro = 0
    # DDP all-reduces gradients in every backward; between optimiser steps that is wasted
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    lr = schedule(step)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for x, target, bad in loader:
        skipped += bad
        if x.numel() == 0:
            continue
        x = x.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if mixup is not None:
            x, target = mixup(x, target)
        last_micro = (micro + 1) % accum_steps == 0
        with contextlib.nullcontext() if last_micro else no_sync():
            with autocast(device, amp):
                outputs = model(x)
                teacher_logits = teacher(x) if teacher is not None else None
            out = criterion(outputs, target, teacher_logits)
            loss = out.loss / accum_steps
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum += out.loss.detach()
        images += x.shape[0]
        micro += 1
        if micro % accum_steps:
            continue
        lr = schedule.apply(optimizer, step)
        if scaler is not None:
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        step += 1
        done = micro // accum_steps
        bar.update(1)
        if done % log_interval == 0 or done == total:
            mean_loss = _global_mean(loss_sum, micro)
            _check_finite(mean_loss, epoch, step)
            rate = images * dist_info().world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if on_log is not None:
                on_log(step, mean_loss, lr)
        if done == total:
            break
    bar.close()
    seconds = time.perf_counter() - start
    mean_loss = _global_mean(loss_sum, max(1, micro))
    _check_finite(mean_loss, epoch, step)
    images *= dist_info().world_size  # every rank ran the same number of equal batches
    skipped = [s for rank in all_gather_objects(skipped) for s in rank]
    stats = EpochStats(mean_loss, lr, images, seconds, micro // accum_steps, skipped)
    return stats, step


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
    """Top-1, top-5 (or top-k for fewer classes), mean loss and image count on ``loader``.

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
    start = time.perf_counter()
    # agreed before the first forward pass: a collective between two forward passes of an
    # FSDP model would be matched with the other ranks' weight gathers and hang
    most = _most_batches(loader, device)
    passes, last = 0, None
    for x, target, bad in tqdm(loader, desc=description, disable=not progress, leave=False):
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
        logits = logits.float()
        k = min(5, logits.shape[-1])
        hits = logits.topk(k, dim=-1).indices == target[:, None]
        sums += torch.stack(
            [
                torch.nn.functional.cross_entropy(logits, target, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=-1).sum().double(),
                torch.tensor(float(x.shape[0]), device=device, dtype=torch.float64),
            ]
        )
    if passes < most and last is None:
        raise ValueError("this rank has no readable evaluation batch to keep step with")
    for _ in range(most - passes):  # results discarded
        with autocast(device, amp):
            model(last)
    all_reduce_sum(sums)
    skipped = [s for rank in all_gather_objects(skipped) for s in rank]
    seconds = time.perf_counter() - start
    loss_sum, correct1, correct5, images = sums.tolist()
    images = int(images)
    n = max(1, images)
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "images": images,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "skipped": skipped,
    }


def _most_batches(loader: Iterable, device: torch.device) -> int:
    """The largest number of batches any rank's ``loader`` has (0 on one process)."""
    if dist_info().world_size == 1:
        return 0
    return int(all_reduce_max(torch.tensor(len(loader), device=device)).item())
