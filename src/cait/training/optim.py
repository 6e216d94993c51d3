"""Optimiser, learning-rate schedule and weight EMA for the CaiT recipe."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cait.training.config import OptimConfig

__all__ = ["LRSchedule", "ModelEma", "Optimisation", "build_optimizer", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the recipe's exclusions (every 1-D parameter, i.e.
    biases, norms and LayerScale gammas, plus ``model.no_weight_decay()``: pos_embed,
    cls_token)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=lr, betas=config.betas, eps=config.eps
    )


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a pure function of the optimiser step (stepped per iteration).

    Linear warmup from ``warmup_lr`` to ``peak_lr`` over ``warmup_epochs``, then cosine decay
    to ``min_lr`` at the end of training, a step decay (``decay_rate`` every
    ``decay_epochs``), or a constant rate.
    """

    peak_lr: float
    config: OptimConfig
    steps_per_epoch: int
    epochs: int

    def __call__(self, step: int) -> float:
        c = self.config
        epoch = step / self.steps_per_epoch
        warmup_steps = c.warmup_epochs * self.steps_per_epoch
        if step < warmup_steps:
            return c.warmup_lr + (self.peak_lr - c.warmup_lr) * step / warmup_steps
        if c.schedule == "constant":
            return self.peak_lr
        if c.schedule == "step":
            return self.peak_lr * c.decay_rate ** math.floor(epoch / c.decay_epochs)
        total = self.epochs * self.steps_per_epoch
        progress = min(1.0, (step - warmup_steps) / max(1.0, total - warmup_steps))
        return c.min_lr + 0.5 * (self.peak_lr - c.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


class ModelEma:
    """Exponential moving average of a model's weights (float tensors; buffers copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move towards ``model``'s weights (the model itself, or inside DDP)."""
        if isinstance(model, DistributedDataParallel):
            model = model.module
        ema = self.module.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                ema[name].lerp_(value.detach(), 1.0 - self.decay)
            else:
                ema[name].copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


@dataclass
class Optimisation:
    """What an optimiser step needs and changes: the optimiser, its schedule, the fp16 loss
    scaler, gradient accumulation and clipping, and the weight EMA."""

    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEma | None = None
    accum_steps: int = 1
    clip_grad: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of one micro-batch's share of the step's loss (scaled under fp16)."""
        loss = loss / self.accum_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, model: nn.Module, step: int) -> float:
        """Optimiser step ``step`` with the accumulated gradients: set the learning rate,
        clip, step, clear the gradients and move the EMA. Returns the learning rate."""
        lr = self.schedule.apply(self.optimizer, step)
        if self.scaler is not None:
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model)
        return lr
