"""Training and evaluation transforms, and mixup/cutmix.

Augmentation comes from timm's data utilities, as in the DeiT/CaiT recipe, set by
:class:`cait.data.config.AugmentConfig`; the input spec (size, crop, interpolation, mean,
std) is the model's (:class:`cait.models.InputSpec`).
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageOps
from timm.data import Mixup, create_transform

from cait.data.config import AugmentConfig
from cait.models.checks import CROP_PCT_RANGE, number
from cait.models.registry import InputSpec

__all__ = ["CROP_PCT_WHY", "build_mixup", "check_crop_pct", "eval_transform", "train_transform"]

# Why the eval crop ratio has a floor: the image is resized to img_size / crop_pct before
# the centre crop, so a tiny ratio makes a huge resize (0.001 turns a 16-pixel input into
# 16000 x 16000 pixels, minutes and gigabytes per image; 1e-9 overflows).
CROP_PCT_WHY = (
    f"the image is resized to img_size / crop_pct before the centre crop, and below "
    f"{CROP_PCT_RANGE[0]} that resize would be over {1 / CROP_PCT_RANGE[0]:g} times the "
    "input's side"
)


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


def check_crop_pct(crop_pct: float, where: str = "crop_pct") -> float:
    """``crop_pct`` if it is a finite number in ``CROP_PCT_RANGE``, else a one-line
    ``ValueError`` that says why the range has a floor."""
    try:
        return number(*CROP_PCT_RANGE)(crop_pct, where)
    except ValueError as err:
        raise ValueError(f"{err}: {CROP_PCT_WHY}") from None


def eval_transform(settings: InputSpec) -> Callable:
    """Resize to ``img_size / crop_pct`` and center-crop (crop 1.0 for CaiT, 0.875 DeiT);
    a crop ratio outside ``CROP_PCT_RANGE`` (or not finite) is refused."""
    return create_transform(
        settings.img_size,
        is_training=False,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        # checked: timm reads crop_pct=0 as "not given" (its default, 0.875)
        crop_pct=check_crop_pct(settings.crop_pct),
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
