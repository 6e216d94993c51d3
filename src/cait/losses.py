"""Training objectives, separate from the model; each returns its named parts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossOutput", "classification_loss"]


@dataclass
class LossOutput:
    """``loss`` is what is minimised; ``base`` is the classification term."""

    loss: Tensor
    base: Tensor


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> LossOutput:
    """Cross-entropy against hard labels ``(B,)`` (with label smoothing) or soft targets
    ``(B, classes)`` such as mixup/cutmix produce (smoothing is already folded into those)."""
    if target.ndim == 2:
        base = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    else:
        base = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    return LossOutput(loss=base, base=base)
