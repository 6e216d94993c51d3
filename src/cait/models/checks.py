"""Checks for values read from files: closed ranges and choices, and the bounds on what a
file may ask a model to be.

A checkpoint's metadata (:mod:`cait.models.weights_file`) and the timm constructor fields cait
passes on (:mod:`cait.models.timm_interop`) are checked with these, so that nothing read from
a file reaches a constructor or an allocation unchecked (STYLE principle 13). Each check
raises a one-line ``ValueError`` naming where the value was read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cait.schema import shown

__all__ = [
    "CROP_PCT_RANGE",
    "INTERPOLATIONS",
    "MAX_CHANNELS",
    "MAX_CLASSES",
    "MAX_DEPTH",
    "MAX_IMG_SIZE",
    "MAX_WIDTH",
    "RATE",
    "Check",
    "choice",
    "flag",
    "integer",
    "number",
    "sequence",
    "size",
]

# Bounds on what a checkpoint may ask for. They keep building the skeleton cheap (a block is a
# dozen Python modules even on the meta device) and an input tensor small (a 4096x4096 RGB
# float image is 200 MB); tensor sizes are checked against the file, not against these.
MAX_DEPTH = 1000  # blocks per stage; the deepest released CaiT has 48 (M48)
MAX_WIDTH = 65536  # embedding width; the widest released CaiT has 768
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,843
MAX_CHANNELS = 64  # input channels
MAX_IMG_SIZE = 4096  # pixels per side; the largest input of any timm pretrained config is 1024
# Eval crop ratio: the image is resized to img_size / crop_pct; timm's configs use 0.875-1.15.
CROP_PCT_RANGE = (0.25, 2.0)
# timm's interpolation names (timm.data.transforms.str_to_pil_interp)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

Check = Callable[[Any, str], Any]


def integer(low: int, high: int) -> Check:
    def check(value: Any, where: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"{where} must be an integer in [{low}, {high}], got {shown(value)}")
        return value

    return check


def number(low: float, high: float, *, high_open: bool = False) -> Check:
    def check(value: Any, where: str) -> float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and low <= value <= high) or (
            high_open and value == high
        ):
            bracket = ")" if high_open else "]"
            raise ValueError(
                f"{where} must be a number in [{low}, {high}{bracket}, got {shown(value)}"
            )
        return float(value)

    return check


def flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {shown(value)}")
    return value


def choice(*choices: str) -> Check:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{where} must be one of {list(choices)}, got {shown(value)}")
        return value

    return check


def sequence(item: Check, lengths: tuple[int, int]) -> Check:
    """A list or tuple of ``lengths[0]`` to ``lengths[1]`` values, each checked by ``item``
    (returned as a tuple)."""
    low, high = lengths
    count = f"{low}" if low == high else f"{low} to {high}"

    def check(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or not low <= len(value) <= high:
            raise ValueError(f"{where} must be a list of {count} values, got {shown(value)}")
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


def size(item: Check) -> Check:
    """An integer, or a pair of them (height, width) as timm takes image and patch sizes."""
    pair = sequence(item, (2, 2))

    def check(value: Any, where: str) -> int | tuple[int, ...]:
        return pair(value, where) if isinstance(value, list | tuple) else item(value, where)

    return check


RATE = number(0.0, 1.0, high_open=True)
