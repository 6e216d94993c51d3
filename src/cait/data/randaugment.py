"""Faster pixel kernels for four of RandAugment's geometric ops (timm's ``ShearX``,
``ShearY``, ``TranslateXRel`` and ``TranslateYRel``), for the fast training path
(:func:`cait.data.transforms.fast_train_transform`).

Each of these ops is a PIL ``AFFINE`` transform that moves every row (or every column) of
the image by its own distance, so that PIL's bicubic 4 x 4 filter (``Geometry.c``, a = -1,
in double precision, truncated to uint8) reduces to one 4-tap filter along each line. PIL
runs it per pixel and per band (2.3 ms for a 224 x 224 image on one core); here the lines
are resampled in one pass of vectorised torch operations (about 0.5 ms). The pixels are
PIL's but for rounding: float32 instead of double flips a truncation now and then, by one
grey level (about 2 pixels in 10,000; tests/data/test_randaugment.py holds it).

Only the kernel changes: which op runs, with which probability and magnitude, stays timm's
(:class:`FastOp` is put in place of the op's ``aug_fn``, and takes timm's arguments), and
anything but a bicubic RGB image with a fill colour goes to timm's own function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["FAST_OPS", "FastOp", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel"]


def _resample_lines(pixels: torch.Tensor, offsets: torch.Tensor, across: bool) -> torch.Tensor:
    """Each line of uint8 ``(H, W, C)`` ``pixels`` (a row, or with ``across`` a column)
    resampled at ``j + offsets[line]`` for its positions ``j`` (PIL's ``xin - 0.5``) by
    PIL's bicubic (a = -1; neighbours past the ends clipped to them, as ``XCLIP``), as
    float32 ``(C, lines, positions)`` planes, not yet truncated."""
    h, w, c = pixels.shape
    n, m = (w, h) if across else (h, w)
    start = torch.floor(offsets)
    d = (offsets - start).to(torch.float32).view(1, n, 1)
    taps = torch.arange(m + 3, dtype=torch.int32)
    index = (start.to(torch.int32).view(n, 1) - 1 + taps).clamp_(0, m - 1)
    lines = torch.arange(n, dtype=torch.int32).view(n, 1)
    index = (index * w + lines if across else index + lines * w).view(-1).mul_(c)
    flat = pixels.view(-1)
    g = torch.empty((c, n * (m + 3)), dtype=torch.uint8)
    for band in range(c):  # one 1-D gather per band: 4x faster than a 2-D one
        torch.index_select(flat, 0, index + band, out=g[band])
    g = g.view(c, n, m + 3).float()
    v1, v2, v3, v4 = g[..., :-3], g[..., 1:-2], g[..., 2:-1], g[..., 3:]
    # Geometry.c's BICUBIC, v2 + d (p2 + d (p3 + d p4)), as weights of the differences
    # from v2 (so that a flat region stays exactly flat, as there)
    w1 = d * (-1 + d * (2 - d))
    w3 = d * (1 + d * (1 - d))
    w4 = d * d * (d - 1)
    out = torch.addcmul(v2, v1 - v2, w1)
    return out.addcmul_(v3 - v2, w3).addcmul_(v4 - v2, w4)


def _shift_lines(
    img: Image.Image, offsets: torch.Tensor, across: bool, fill: tuple[int, ...]
) -> Image.Image:
    """PIL's bicubic ``AFFINE`` transform of RGB ``img`` for a map that moves line ``i``
    (a row, or with ``across`` a column) by ``offsets[i]`` pixels (float64): positions
    whose source falls outside the image take ``fill``, as with PIL's ``fillcolor``."""
    with warnings.catch_warnings():  # PIL's array is read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(img))  # (H, W, C)
    m = pixels.shape[0] if across else pixels.shape[1]
    out = _resample_lines(pixels, offsets, across).clamp_(0, 255).to(torch.uint8)  # truncates
    source = offsets.view(-1, 1) + (torch.arange(m, dtype=torch.float64) + 0.5)
    outside = (source < 0) | (source >= m)
    for band, value in zip(out, fill, strict=True):
        band.masked_fill_(outside, value)
    planes = [Image.fromarray(band.numpy()) for band in out]
    shifted = Image.merge("RGB", planes)
    return shifted.transpose(Image.Transpose.TRANSPOSE) if across else shifted


def _lines(count: int) -> torch.Tensor:
    """PIL's pixel centres along the other axis: ``0.5, 1.5, ...`` (float64)."""
    return torch.arange(count, dtype=torch.float64) + 0.5


def shear_x(img: Image.Image, factor: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``shear_x``: ``AFFINE (1, factor, 0, 0, 1, 0)``, row ``y`` read from
    ``x + factor * (y + 0.5)``."""
    return _shift_lines(img, factor * _lines(img.size[1]), False, fill)


def shear_y(img: Image.Image, factor: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``shear_y``: ``AFFINE (1, 0, 0, factor, 1, 0)``."""
    return _shift_lines(img, factor * _lines(img.size[0]), True, fill)


def translate_x_rel(img: Image.Image, pct: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_x_rel``: ``AFFINE (1, 0, pct * width, 0, 1, 0)``."""
    pixels = pct * img.size[0]
    return _shift_lines(img, torch.full((img.size[1],), pixels, dtype=torch.float64), False, fill)


def translate_y_rel(img: Image.Image, pct: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_y_rel``: ``AFFINE (1, 0, 0, 0, 1, pct * height)``."""
    pixels = pct * img.size[1]
    return _shift_lines(img, torch.full((img.size[0],), pixels, dtype=torch.float64), True, fill)


# timm's op name -> our kernel for it
FAST_OPS: dict[str, Callable[..., Image.Image]] = {
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


class FastOp:
    """An op's ``aug_fn`` with timm's signature (``img, level, fillcolor=, resample=``): our
    ``kernel`` for an RGB image, bicubic, with an RGB fill colour; else timm's
    ``fallback`` (another filter, a random choice of filters, another mode)."""

    def __init__(self, kernel: Callable[..., Image.Image], fallback: Callable) -> None:
        self.kernel, self.fallback = kernel, fallback

    def __call__(self, img: Image.Image, level: float, **kwargs: Any) -> Image.Image:
        fill = kwargs.get("fillcolor")
        if (
            img.mode == "RGB"
            and kwargs.get("resample") == Image.Resampling.BICUBIC
            and isinstance(fill, tuple)
            and len(fill) == 3
        ):
            return self.kernel(img, level, fill)
        return self.fallback(img, level, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kernel.__name__})"
