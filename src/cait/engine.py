"""One training epoch and one evaluation pass, separate from the run's set-up."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from cait.losses import DistillationLoss
from cait.optim import LRSchedule, ModelEma
from cait.runtime import autocast

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
    """
    model.train()
    criterion = criterion if criterion is not None else DistillationLoss("none")
    total = len(loader) // accum_steps  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    images = 0
    skipped: list[str] = []
    micro = 0
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
            mean_loss = loss_sum.item() / micro
            _check_finite(mean_loss, epoch, step)
            rate = images / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if on_log is not None:
                on_log(step, mean_loss, lr)
        if done == total:
            break
    bar.close()
    seconds = time.perf_counter() - start
    mean_loss = loss_sum.item() / max(1, micro)
    _check_finite(mean_loss, epoch, step)
    stats = EpochStats(mean_loss, lr, images, seconds, micro // accum_steps, skipped)
    return stats, step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: str = "none",
    progress: bool = False,
    description: str = "eval",
) -> dict:
    """Top-1, top-5 (or top-k for fewer classes), mean loss and image count on ``loader``."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct1 = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros((), device=device, dtype=torch.long)
    images = 0
    skipped: list[str] = []
    start = time.perf_counter()
    for x, target, bad in tqdm(loader, desc=description, disable=not progress, leave=False):
        skipped += bad
        if x.numel() == 0:
            continue
        x = x.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        if isinstance(logits, tuple):  # a distilled model left in training mode
            logits = (logits[0] + logits[1]) / 2
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == target[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=-1).sum()
        images += x.shape[0]
    seconds = time.perf_counter() - start
    n = max(1, images)
    return {
        "top1": 100.0 * correct1.item() / n,
        "top5": 100.0 * correct5.item() / n,
        "loss": loss_sum.item() / n,
        "images": images,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "skipped": skipped,
    }
