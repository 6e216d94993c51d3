"""Training objectives, separate from the model; each returns its named parts.

Distillation follows DeiT (Touvron et al. 2021, ``losses.py``): the total is
``(1 - alpha) * base + alpha * distill``, where ``base`` is the classification loss on the
class-token logits and ``distill`` compares the distillation-token logits (or, for a model
without a distillation token, the class-token logits) with a frozen teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DISTILLATION_KINDS",
    "SOFT_NORMALISATIONS",
    "DistillKind",
    "SoftNormalisation",
    "DistillationLoss",
    "LossOutput",
    "classification_loss",
    "hard_distillation",
    "soft_distillation",
]

# The distillation kinds and the soft loss's normalisations, each defined once (the
# training config and the CLI read them).
DistillKind = Literal["none", "soft", "hard"]
SoftNormalisation = Literal["per_sample", "deit_legacy"]
DISTILLATION_KINDS: tuple[str, ...] = get_args(DistillKind)
SOFT_NORMALISATIONS: tuple[str, ...] = get_args(SoftNormalisation)


@dataclass
class LossOutput:
    """``loss`` is what is minimised; ``base`` the classification term; ``distill`` the
    distillation term (zero without a teacher)."""

    loss: Tensor
    base: Tensor
    distill: Tensor | None = None


def _base_loss(logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    if target.ndim == 2:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def classification_loss(
    logits: Tensor | tuple[Tensor, Tensor], target: Tensor, label_smoothing: float = 0.0
) -> LossOutput:
    """Cross-entropy against hard labels ``(B,)`` (with label smoothing) or soft targets
    ``(B, classes)`` such as mixup/cutmix produce (smoothing is already folded into those).

    For a distilled model's ``(cls, dist)`` pair without a teacher, both heads learn the
    labels and the loss is their mean.
    """
    if isinstance(logits, tuple):
        base = sum(_base_loss(lg, target, label_smoothing) for lg in logits) / len(logits)
    else:
        base = _base_loss(logits, target, label_smoothing)
    return LossOutput(loss=base, base=base)


def soft_distillation(
    student: Tensor, teacher: Tensor, tau: float, normalisation: SoftNormalisation = "per_sample"
) -> Tensor:
    """``KL(softmax(t / tau) || softmax(s / tau)) * tau^2`` (Hinton et al. 2015).

    ``per_sample`` sums over classes and averages over the batch (the usual KL
    divergence per sample). ``deit_legacy`` divides the sum by ``batch * classes``, as
    DeiT's ``losses.py`` does, which is smaller by exactly the number of classes.
    """
    kl = F.kl_div(
        F.log_softmax(student.float() / tau, dim=-1),
        F.log_softmax(teacher.float() / tau, dim=-1),
        reduction="sum",
        log_target=True,
    )
    denom = student.shape[0] if normalisation == "per_sample" else student.numel()
    return kl * tau * tau / denom


def hard_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross-entropy against the teacher's top class: its confidence does not matter."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=-1))


class DistillationLoss:
    """The classification loss plus a distillation term from teacher logits.

    ``kind``: ``none`` (classification only), ``soft`` or ``hard``. With a distilled model
    the class-token logits get ``base`` and the distillation-token logits ``distill``;
    with a plain model both terms apply to the same logits.
    """

    def __init__(
        self,
        kind: DistillKind = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
        normalisation: SoftNormalisation = "per_sample",
    ) -> None:
        if kind not in DISTILLATION_KINDS:
            raise ValueError(
                f"distillation must be one of {list(DISTILLATION_KINDS)}, got {kind!r}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"distillation tau must be positive, got {tau}")
        if normalisation not in SOFT_NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {list(SOFT_NORMALISATIONS)}, got {normalisation!r}"
            )
        self.kind = kind
        self.alpha = alpha
        self.tau = tau
        self.label_smoothing = label_smoothing
        self.normalisation = normalisation

    def __call__(
        self,
        outputs: Tensor | tuple[Tensor, Tensor],
        target: Tensor,
        teacher_logits: Tensor | None = None,
    ) -> LossOutput:
        if self.kind == "none":
            return classification_loss(outputs, target, self.label_smoothing)
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        if teacher_logits is None:
            raise ValueError(f"{self.kind} distillation needs the teacher's logits")
        base = _base_loss(cls_logits, target, self.label_smoothing)
        if self.kind == "soft":
            distill = soft_distillation(dist_logits, teacher_logits, self.tau, self.normalisation)
        else:
            distill = hard_distillation(dist_logits, teacher_logits)
        loss = (1.0 - self.alpha) * base + self.alpha * distill
        return LossOutput(loss=loss, base=base, distill=distill)
