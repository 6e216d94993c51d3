"""Training and evaluation transforms, and mixup/cutmix.

Augmentation comes from timm's data utilities, as in the DeiT/CaiT recipe, set by
:class:`cait.data.config.AugmentConfig`; the input spec (size, crop, interpolation, mean,
std) is the model's (:class:`cait.models.InputSpec`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_dataset, create_loader, create_transform
from timm.data.transforms import MaybePILToTensor, str_to_pil_interp
from torchvision.transforms import RandomHorizontalFlip

from cait.data import pixel_kernels
from cait.data.config import AugmentConfig
from cait.data.decode import DeviceAugment, ResizedCrop, ToPlanarTensor
from cait.data.randaugment import FAST_OPS, FastOp
from cait.models.checks import CROP_PCT_RANGE, number
from cait.models.registry import InputSpec

__all__ = [
    "CROP_PCT_WHY",
    "build_mixup",
    "check_crop_pct",
    "device_augment",
    "eval_transform",
    "fast_eval_transform",
    "fast_train_transform",
    "timm_loader",
    "train_transform",
]

log = logging.getLogger(__name__)

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


@functools.cache
def _say_no_numba() -> None:
    """Log, once, that RandAugment keeps timm's kernels for want of numba."""
    log.info(
        "numba is not installed: RandAugment's rotate, shear, translate and sharpness run "
        "timm's PIL kernels, about 0.6 ms an image slower (pip install numba, or the fast "
        "extra; the same pixels either way)"
    )


def _use_fast_ops(transform: Callable) -> None:
    """Put :mod:`cait.data.randaugment`'s kernels in place of timm's for the ops it has
    (rotate, shear, translate, sharpness); which op runs, how often and how strongly stays timm's.
    Without numba the ops keep timm's kernels (said once in the log)."""
    ops = [
        op
        for t in getattr(transform, "transforms", [])
        for op in getattr(t, "ops", [])
        if getattr(op, "name", "") in FAST_OPS and not isinstance(op.aug_fn, FastOp)
    ]
    if not ops:  # no RandAugment (or done already): nothing to compile or say
        return
    if not pixel_kernels.AVAILABLE:
        _say_no_numba()
        return
    pixel_kernels.warm()  # compiled here, before the loader's workers fork
    for op in ops:
        kernel, geometric = FAST_OPS[op.name]
        op.aug_fn = FastOp(kernel, op.aug_fn, geometric=geometric)


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


def fast_train_transform(
    settings: InputSpec,
    augment: AugmentConfig,
    draft: bool = True,
    engine: str = "torch",
    reducing_gap: float | None = None,
    randaugment: bool = True,
    decoder: str = "auto",
    fast_ops: bool = True,
) -> Callable:
    """:func:`train_transform` with the faster decode path of :mod:`cait.data.decode`: the
    same crop distribution, flip and RandAugment, on an image from
    :func:`cait.data.decode.open_image` (decoded in the crop step, at a DCT scale when the
    crop is shrunk 2x or more, and resized by ``engine``: torch or PIL), returning a uint8
    ``(C, H, W)`` tensor. ``decoder``: who decodes a JPEG that torch resizes (``"auto"``:
    simplejpeg where it is installed, else PIL; the same pixels); ``fast_ops``: RandAugment's
    rotate, shear, translate and sharpness by :mod:`cait.data.randaugment` where numba is installed
    (PIL's pixels, 2-9x sooner). Normalising and
    random erasing move to the device, batched: :func:`device_augment`.
    ``randaugment=False`` leaves out RandAugment (and colour jitter), for the benchmarks.
    It says ``decodes_itself``: the data sources hand it images opened, not decoded."""
    if settings.interpolation == "random":
        raise ValueError("the fast training transform needs one interpolation, not 'random'")
    transform = create_transform(
        settings.img_size,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter if randaugment else None,
        auto_augment=augment.auto_augment if randaugment else None,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        use_prefetcher=True,  # uint8 CHW out: no ToTensor, Normalize or RandomErasing
    )
    crop = transform.transforms[0]
    # With nothing but the flip between the crop and the tensor, the crop's tensor goes
    # on (torchvision's flip takes tensors, timm's MaybePILToTensor passes them through).
    tensors_after = all(
        isinstance(t, (RandomHorizontalFlip, MaybePILToTensor)) for t in transform.transforms[1:]
    )
    transform.transforms[0] = ResizedCrop(
        settings.img_size,
        scale=crop.scale,
        ratio=crop.ratio,
        interpolation=str_to_pil_interp(settings.interpolation),
        draft=draft,
        engine=engine,
        reducing_gap=reducing_gap,
        to_tensor=tensors_after,
        decoder=decoder,
    )
    if not tensors_after and isinstance(transform.transforms[-1], MaybePILToTensor):
        transform.transforms[-1] = ToPlanarTensor()  # the same pixels, collated without a copy
    _allow_zero_bit_posterize(transform)
    if fast_ops:
        _use_fast_ops(transform)
    # the sources give it undecoded images, which its crop step decodes at the scale it needs
    transform.decodes_itself = True
    return transform


def device_augment(settings: InputSpec, augment: AugmentConfig) -> DeviceAugment:
    """The batched, on-device end of :func:`fast_train_transform`: normalise with the
    model's mean and std, then the recipe's random erasing."""
    return DeviceAugment(
        settings.mean, settings.std, augment.re_prob, augment.re_mode, augment.re_count
    )


def timm_loader(
    folder: str | Path,
    settings: InputSpec,
    augment: AugmentConfig,
    training: bool,
    batch_size: int,
    workers: int,
    randaugment: bool = True,
) -> Iterable:
    """timm's own loader over an image folder (``timm.data.create_dataset`` +
    ``create_loader``, its prefetcher on the CPU: uint8 batches, normalised and erased
    batched) with our recipe's settings, for ``cait bench --data`` to time beside ours.
    ``randaugment=False`` leaves out RandAugment, colour jitter and erasing."""
    dataset = create_dataset("", root=str(folder), split="train" if training else "validation")
    loader = create_loader(
        dataset,
        input_size=(3, settings.img_size, settings.img_size),
        batch_size=batch_size,
        is_training=training,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter if randaugment else None,
        auto_augment=augment.auto_augment if randaugment else None,
        re_prob=augment.re_prob if randaugment else 0.0,
        re_mode=augment.re_mode,
        re_count=augment.re_count,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        crop_pct=check_crop_pct(settings.crop_pct),
        num_workers=workers,
        device=torch.device("cpu"),
        use_prefetcher=True,
        persistent_workers=workers > 0,
    )
    _allow_zero_bit_posterize(dataset.transform)
    return loader


def check_crop_pct(crop_pct: float, where: str = "crop_pct") -> float:
    """``crop_pct`` if it is a finite number in ``CROP_PCT_RANGE``, else a one-line
    ``ValueError`` that says why the range has a floor."""
    try:
        return number(*CROP_PCT_RANGE)(crop_pct, where)
    except ValueError as err:
        raise ValueError(f"{err}: {CROP_PCT_WHY}") from None


def eval_transform(settings: InputSpec, uint8: bool = False) -> Callable:
    """Resize to ``img_size / crop_pct`` and center-crop (crop 1.0 for CaiT, 0.875 DeiT);
    a crop ratio outside ``CROP_PCT_RANGE`` (or not finite) is refused. ``uint8``: a uint8
    ``(C, H, W)`` tensor out (the same pixels), normalised later on the device, batched."""
    return create_transform(
        settings.img_size,
        is_training=False,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        # checked: timm reads crop_pct=0 as "not given" (its default, 0.875)
        crop_pct=check_crop_pct(settings.crop_pct),
        use_prefetcher=uint8,  # uint8 CHW out: no ToTensor or Normalize
    )


def fast_eval_transform(settings: InputSpec) -> Callable:
    """:func:`eval_transform`'s resize and centre crop (the same PIL operations, so the same
    pixels), returning a uint8 ``(C, H, W)`` tensor: normalising moves to the device,
    batched (:class:`cait.data.decode.DeviceAugment` with the model's mean and std)."""
    return eval_transform(settings, uint8=True)


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
