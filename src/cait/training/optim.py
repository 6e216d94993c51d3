"""Optimiser, learning-rate schedule and weight EMA for the CaiT recipe."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cait.training.config import OptimConfig
from cait.training.parallel import unwrap

__all__ = ["LRSchedule", "ModelEma", "Optimisation", "build_optimizer", "param_groups"]

logger = logging.getLogger(__name__)


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """The optimiser's parameter groups (``model`` itself, or inside DDP).

    Weight decay skips the recipe's exclusions: every 1-D parameter (biases, norms and
    LayerScale gammas) and ``model.no_weight_decay()`` (pos_embed, cls_token). Without
    ``layer_decay`` there are two groups, decayed and excluded. With it, one group per layer
    and decay setting, each with ``lr_scale = layer_decay ** (num_layers - 1 - layer)``:
    the head's is 1 and each layer below it learns ``layer_decay`` times slower (layers
    from ``model.group_matcher``, see :func:`_layer_ids`).
    """
    model = unwrap(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decayed = {name: p.ndim > 1 and name not in skip for name, p in named}
    if layer_decay is None:
        return [
            {"params": [p for name, p in named if decayed[name]], "weight_decay": weight_decay},
            {"params": [p for name, p in named if not decayed[name]], "weight_decay": 0.0},
        ]
    layers, num_layers = _layer_ids(model, [name for name, _ in named])
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        key = (layers[name], decayed[name])
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decayed[name] else 0.0,
                "lr_scale": layer_decay ** (num_layers - 1 - layers[name]),
            }
        groups[key]["params"].append(p)
    # stem first, head last; within a layer the decayed group first
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def _layer_ids(model: nn.Module, names: list[str]) -> tuple[dict[str, int], int]:
    """Each parameter's layer in ``0 .. num_layers - 1``, and ``num_layers``.

    ``model.group_matcher(coarse=False)`` keeps timm's contract: a callable from a parameter
    name to a layer id, 0 for the stem (patch embedding, cls_token, pos_embed) up to the last
    block, and ``inf`` for what comes after (the head). The head becomes one more layer on
    top, so ``num_layers`` is the largest finite id + 2, as in timm's layer decay.
    """
    cls = type(model).__name__
    if not hasattr(model, "group_matcher"):
        raise ValueError(
            f"optim.layer_decay needs the model's layers (a group_matcher method); "
            f"{cls} has none: set optim.layer_decay to null"
        )
    match = model.group_matcher(coarse=False)
    if not callable(match):
        raise ValueError(
            f"optim.layer_decay reads group_matcher() as a function from a parameter name "
            f"to a layer id; {cls}'s gives a {type(match).__name__} of patterns: set "
            "optim.layer_decay to null"
        )
    ids = {name: match(name) for name in names}
    for name, layer in ids.items():
        if not (layer == math.inf or (isinstance(layer, int) and layer >= 0)):
            raise ValueError(
                f"{cls}.group_matcher() gives {name} the layer id {layer!r}; expected an "
                "integer >= 0 or inf (after the last layer)"
            )
    head = max((layer for layer in ids.values() if layer != math.inf), default=-1) + 1
    return {name: head if layer == math.inf else layer for name, layer in ids.items()}, head + 1


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, each group at ``lr`` times its ``lr_scale``.

    Loading a state dict with other groups (another ``optim.layer_decay``) raises instead of
    training on with the saved groups' scales (torch compares only the groups' sizes).
    """
    groups = param_groups(model, config.weight_decay, config.layer_decay)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps)
    optimizer.register_load_state_dict_pre_hook(_check_group_layout)
    if config.layer_decay is not None:
        scales = [g["lr_scale"] for g in groups]
        logger.info(
            "layer decay %g: %d parameter groups, lr scale %.3g (stem) to %.3g (head)",
            config.layer_decay,
            len(groups),
            min(scales),
            max(scales),
        )
    return optimizer


def _group_layout(groups: list[dict[str, Any]]) -> list[tuple[int, float | None]]:
    return [(len(g["params"]), g.get("lr_scale")) for g in groups]


def _check_group_layout(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A ``load_state_dict`` pre-hook: the saved groups must be this optimiser's (sizes and
    lr scales); loading would otherwise replace each group's lr scale with the saved one."""
    saved, ours = state["param_groups"], optimizer.param_groups
    if _group_layout(saved) != _group_layout(ours):

        def describe(groups: list[dict[str, Any]]) -> str:
            scaled = any("lr_scale" in g for g in groups)
            return f"{len(groups)} groups {'with' if scaled else 'without'} layer-wise lr scales"

        raise ValueError(
            f"the saved optimiser state has other parameter groups than this run "
            f"(saved: {describe(saved)}; this run: {describe(ours)}): resume with the "
            "optim.layer_decay the checkpoint was trained with"
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
        """Set each group's rate to the schedule's times the group's ``lr_scale`` (layer
        decay; 1 without); returns the schedule's."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
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
        ema = self.module.state_dict()
        for name, value in unwrap(model).state_dict().items():
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
