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

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["FAST_OPS", "FastOp", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel"]


def _resample_rows(bands: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each row ``i`` of uint8 ``(C, H, W)`` ``bands`` resampled at ``x + offsets[i]`` for
    its positions ``x`` (PIL's ``xin - 0.5``) by PIL's bicubic (a = -1, neighbours past the
    ends clipped to them as ``XCLIP``), as float32 ``(C, H, W)``, not yet truncated."""
    c, h, w = bands.shape
    start = torch.floor(offsets)
    d = (offsets - start).to(torch.float32).view(1, h, 1)
    taps = torch.arange(w + 3, dtype=torch.int32)
    index = (start.to(torch.int32).view(h, 1) - 1 + taps).clamp_(0, w - 1)
    index += torch.arange(0, h * w, w, dtype=torch.int32).view(h, 1)  # flat pixel numbers
    flat = bands.view(c, h * w)
    g = torch.empty((c, h * (w + 3)), dtype=torch.uint8)
    for band in range(c):  # one 1-D gather per band: 4x faster than a 2-D one
        torch.index_select(flat[band], 0, index.view(-1), out=g[band])
    g = g.view(c, h, w + 3).float()
    v1, v2, v3, v4 = g[..., :-3], g[..., 1:-2], g[..., 2:-1], g[..., 3:]
    # Geometry.c's BICUBIC, v2 + d (p2 + d (p3 + d p4)), as weights of the differences
    # from v2 (so that a flat region stays exactly flat, as there)
    w1 = d * (-1 + d * (2 - d))
    w3 = d * (1 + d * (1 - d))
    w4 = d * d * (d - 1)
    out = torch.addcmul(v2, v1 - v2, w1)
    return out.addcmul_(v3 - v2, w3).addcmul_(v4 - v2, w4)


def _shift_rows(
    img: Image.Image, offsets: torch.Tensor, fill: tuple[int, ...], across: bool = False
) -> Image.Image:
    """PIL's bicubic ``AFFINE`` transform of RGB ``img`` for a map that moves row ``i`` by
    ``offsets[i]`` pixels (float64; with ``across``, column ``i``: the image is turned
    first and back after): positions whose source falls outside the image take ``fill``,
    as with PIL's ``fillcolor``."""
    if across:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    bands = torch.from_numpy(np.stack([np.asarray(band) for band in img.split()]))
    c, h, w = bands.shape
    out = _resample_rows(bands, offsets)
    # where the source is outside the row (a prefix and a suffix of it), the fill
    first = torch.ceil(-0.5 - offsets).clamp_(0, w).to(torch.int32)
    end = torch.ceil(w - 0.5 - offsets).clamp_(0, w).to(torch.int32)
    colour = torch.tensor(fill, dtype=torch.float32).view(c, 1, 1)
    if bool((first == first[0]).all() and (end == end[0]).all()):  # a translation
        out[..., : int(first[0])] = colour
        out[..., int(end[0]) :] = colour
    else:
        x = np.arange(w, dtype=np.int32)  # numpy's broadcast compares are 4x torch's here
        keep = (x >= first.numpy()[:, None]) & (x < end.numpy()[:, None])
        out.sub_(colour).mul_(torch.from_numpy(keep.astype(np.float32))).add_(colour)
    # truncated as PIL's (UINT8) cast; numpy's clip and cast are 3x torch's here
    planes = np.clip(out.numpy(), 0, 255).astype(np.uint8)
    shifted = Image.merge("RGB", [Image.fromarray(plane) for plane in planes])
    return shifted.transpose(Image.Transpose.TRANSPOSE) if across else shifted


def _lines(count: int) -> torch.Tensor:
    """PIL's pixel centres along the other axis: ``0.5, 1.5, ...`` (float64)."""
    return torch.arange(count, dtype=torch.float64) + 0.5


def shear_x(img: Image.Image, factor: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``shear_x``: ``AFFINE (1, factor, 0, 0, 1, 0)``, row ``y`` read from
    ``x + factor * (y + 0.5)``."""
    return _shift_rows(img, factor * _lines(img.size[1]), fill)


def shear_y(img: Image.Image, factor: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``shear_y``: ``AFFINE (1, 0, 0, factor, 1, 0)``."""
    return _shift_rows(img, factor * _lines(img.size[0]), fill, across=True)


def translate_x_rel(img: Image.Image, pct: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_x_rel``: ``AFFINE (1, 0, pct * width, 0, 1, 0)``."""
    pixels = pct * img.size[0]
    return _shift_rows(img, torch.full((img.size[1],), pixels, dtype=torch.float64), fill)


def translate_y_rel(img: Image.Image, pct: float, fill: tuple[int, ...]) -> Image.Image:
    """timm's ``translate_y_rel``: ``AFFINE (1, 0, 0, 0, 1, pct * height)``."""
    pixels = pct * img.size[1]
    rows = torch.full((img.size[0],), pixels, dtype=torch.float64)
    return _shift_rows(img, rows, fill, across=True)


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
