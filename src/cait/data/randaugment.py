"""Faster pixel kernels for RandAugment's geometric and sharpness ops (timm's ``Rotate``,
``ShearX``, ``ShearY``, ``TranslateXRel``, ``TranslateYRel``, their absolute ``TranslateX``
and ``TranslateY``, ``Sharpness`` and ``SharpnessIncreasing``), for the fast training path
(:func:`cait.data.transforms.fast_train_transform`).

The kernels are :mod:`cait.data.pixel_kernels`: PIL's own arithmetic compiled by numba,
so the pixels are PIL's exactly, 2-9x sooner (docs/DATA.md has the figures). The shears
and translations are PIL ``AFFINE`` transforms that move every row (or every column) by its
own distance; a column op runs as the row op on the turned image.

Only the kernel changes: which op runs, with which probability and magnitude, stays timm's
(:class:`FastOp` is put in place of the op's ``aug_fn``, and takes timm's arguments), and
anything but an RGB image (for the geometric ops: with the bicubic filter and an RGB fill
colour) goes to timm's own function. Without numba the ops keep timm's functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from cait.data.pixel_kernels import BANDS, affine, shift_rows, smooth_blend

__all__ = [
    "FAST_OPS",
    "FastOp",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x_abs",
    "translate_x_rel",
    "translate_y_abs",
    "translate_y_rel",
]


def _shift_rows(
    img: Image.Image, a1: float, a2: float, fill: tuple[int, ...], across: bool = False
) -> Image.Image:
    """PIL's bicubic ``AFFINE (1, a1, a2, 0, 1, 0)`` transform of RGB ``img`` with
    ``fillcolor=fill``; with ``across``, ``(1, 0, 0, a1, 1, a2)``: the same map down the
    columns, run on the turned pixels (the same sums: IEEE addition commutes)."""
    if across:  # PIL's transpose: 10x numpy's strided copy
        img = img.transpose(Image.Transpose.TRANSPOSE)
    src = np.asarray(img)  # (H, W, 3), read-only
    out = shift_rows(src, 1.0, float(a1), float(a2), np.array(fill, np.uint8), np.empty_like(src))
    shifted = Image.fromarray(out)
    return shifted.transpose(Image.Transpose.TRANSPOSE) if across else shifted


def shear_x(img: Image.Image, factor: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``shear_x``: ``AFFINE (1, factor, 0, 0, 1, 0)``."""
    return _shift_rows(img, factor, 0.0, fill)


def shear_y(img: Image.Image, factor: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``shear_y``: ``AFFINE (1, 0, 0, factor, 1, 0)``."""
    return _shift_rows(img, factor, 0.0, fill, across=True)


def translate_x_abs(img: Image.Image, pixels: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_x_abs``: ``AFFINE (1, 0, pixels, 0, 1, 0)``."""
    return _shift_rows(img, 0.0, pixels, fill)


def translate_y_abs(img: Image.Image, pixels: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_y_abs``: ``AFFINE (1, 0, 0, 0, 1, pixels)``."""
    return _shift_rows(img, 0.0, pixels, fill, across=True)


def translate_x_rel(img: Image.Image, pct: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_x_rel``: ``AFFINE (1, 0, pct * width, 0, 1, 0)``."""
    return _shift_rows(img, 0.0, pct * img.size[0], fill)


def translate_y_rel(img: Image.Image, pct: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_y_rel``: ``AFFINE (1, 0, 0, 0, 1, pct * height)``."""
    return _shift_rows(img, 0.0, pct * img.size[1], fill, across=True)


def _rotation(width: int, height: int, degrees: float) -> tuple[float, ...]:
    """The affine matrix PIL's ``Image.rotate`` builds for a turn by ``degrees``
    (anticlockwise) about the image's centre, the same expressions in the same order:
    each entry of the rotation rounded to 15 decimals, the centre moved to the origin
    and back."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2, height / 2
    return (
        cos,
        sin,
        cos * -cx + sin * -cy + 0.0 + cx,
        -sin,
        cos,
        -sin * -cx + cos * -cy + 0.0 + cy,
    )


def rotate(img: Image.Image, degrees: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``rotate``: ``img.rotate(degrees, BICUBIC, fillcolor=fill)``; turns by a
    multiple of 90 degrees (which PIL copies or transposes) go to PIL."""
    if degrees % 90.0 == 0:
        return img.rotate(degrees, Image.Resampling.BICUBIC, fillcolor=fill)
    src = np.asarray(img)
    matrix = _rotation(*img.size, degrees)
    return Image.fromarray(affine(src, *matrix, np.array(fill, np.uint8), np.empty_like(src)))


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """timm's ``sharpness``: ``ImageEnhance.Sharpness(img).enhance(factor)`` of RGB ``img``
    (``factor`` as PIL's C ``float``)."""
    src = np.asarray(img)
    return Image.fromarray(smooth_blend(src, np.float32(factor), np.empty_like(src)))


# timm's op name -> our kernel for it, and whether it is a geometric op (which takes the
# fill colour, and only with the bicubic filter)
FAST_OPS: dict[str, tuple[Callable[..., Image.Image], bool]] = {
    "ShearX": (shear_x, True),
    "ShearY": (shear_y, True),
    "TranslateX": (translate_x_abs, True),
    "TranslateY": (translate_y_abs, True),
    "TranslateXRel": (translate_x_rel, True),
    "TranslateYRel": (translate_y_rel, True),
    "Rotate": (rotate, True),
    "Sharpness": (sharpness, False),
    "SharpnessIncreasing": (sharpness, False),
}


def _rgb_fill(fill: Any) -> bool:
    """Whether ``fill`` is an RGB colour (three ints 0-255), what the kernels take."""
    return (
        isinstance(fill, tuple)
        and len(fill) == BANDS
        and all(isinstance(v, int) and 0 <= v <= 255 for v in fill)
    )


class FastOp:
    """An op's ``aug_fn`` with timm's signature (``img, level, fillcolor=, resample=``): our
    ``kernel`` for an RGB image (a ``geometric`` one: also bicubic, with an RGB fill colour);
    else timm's ``fallback`` (another filter, a random choice of filters, another mode)."""

    def __init__(
        self, kernel: Callable[..., Image.Image], fallback: Callable, geometric: bool = True
    ) -> None:
        self.kernel, self.fallback, self.geometric = kernel, fallback, geometric

    def __call__(self, img: Image.Image, level: float, **kwargs: Any) -> Image.Image:
        if img.mode != "RGB" or not math.isfinite(level):  # PIL's C code decides those
            return self.fallback(img, level, **kwargs)
        if not self.geometric:
            return self.kernel(img, level)
        fill = kwargs.get("fillcolor")
        if kwargs.get("resample") == Image.Resampling.BICUBIC and _rgb_fill(fill):
            return self.kernel(img, level, fill)
        return self.fallback(img, level, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kernel.__name__})"
