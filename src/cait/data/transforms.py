"""Training and evaluation transforms, the augmentation config, and mixup/cutmix.

Augmentation comes from timm's data utilities, as in the DeiT/CaiT recipe; the input spec
(size, crop, interpolation, mean, std) is the model's (:class:`cait.models.InputSpec`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps
from timm.data import Mixup, create_transform

from cait.models.registry import InputSpec
from cait.schema import check_fields

__all__ = ["AugmentConfig", "build_mixup", "eval_transform", "train_transform"]


# timm's modes: RandomErasing fills with a constant, a random colour per box or random
# pixels; Mixup draws one mixing factor per batch, per pair or per element.
EraseMode = Literal["const", "rand", "pixel"]
MixupMode = Literal["batch", "pair", "elem"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, DeiT/CaiT recipe defaults (DeiT main.py), via timm's utilities."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.3
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: EraseMode = "pixel"
    re_count: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: MixupMode = "batch"
    label_smoothing: float = 0.1
    repeated_aug: int = 3

    def __post_init__(self) -> None:
        check_fields(self, "augment")
        for name in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.repeated_aug < 1:
            raise ValueError(
                f"augment.repeated_aug must be >= 1 (1 = off), got {self.repeated_aug}"
            )
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("augment.mixup and augment.cutmix must be >= 0")

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Posterize that accepts 0 bits (a black image), as Pillow did before version 13."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform: Callable) -> None:
    """timm's RandAugment ``inc1`` policy asks for 0-bit posterize at magnitude 10, which
    Pillow >= 13 rejects with ``ValueError``; swap the op in this transform only."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


def train_transform(settings: InputSpec, augment: AugmentConfig) -> Callable:
    """The recipe's training transform: RandomResizedCrop, flip, RandAugment, erasing."""
    transform = create_transform(
        settings.img_size,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        re_prob=augment.re_prob,
        re_mode=augment.re_mode,
        re_count=augment.re_count,
    )
    _allow_zero_bit_posterize(transform)
    return transform


def eval_transform(settings: InputSpec) -> Callable:
    """Resize to ``img_size / crop_pct`` and center-crop (crop 1.0 for CaiT, 0.875 DeiT)."""
    return create_transform(
        settings.img_size,
        is_training=False,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        crop_pct=settings.crop_pct,
    )


def build_mixup(augment: AugmentConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing folded into the soft targets (or None)."""
    if not augment.mixes:
        return None
    return Mixup(
        mixup_alpha=augment.mixup,
        cutmix_alpha=augment.cutmix,
        prob=augment.mixup_prob,
        switch_prob=augment.mixup_switch_prob,
        mode=augment.mixup_mode,
        label_smoothing=augment.label_smoothing,
        num_classes=num_classes,
    )
