"""Calibration images for int8 with static activation scales (``--calibrate SOURCE``): a
seeded sample of a data source's training split (or of the source, where it is one split),
read with the checkpoint's evaluation transform, and the loaded model made ready in its
precision with them (:func:`prepare_loaded`).

With scales fixed from calibration an image's prediction no longer depends on the other
images of its batch (dynamic scales are measured over the whole batch), and int8 runs
faster: the MLP's hidden tensor stays uint8 (:mod:`cait.precision.int8`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from cait.data import eval_transform
from cait.data.loaders import make_loader, take
from cait.data.sources import SPLITS, is_streamed, open_source
from cait.models.build import LoadedModel
from cait.precision import PreparedModel, prepare_model

__all__ = ["CALIBRATION_IMAGES", "Calibration", "calibration_batches", "prepare_loaded"]

logger = logging.getLogger(__name__)

# Images that fix the activation scales by default: a few batches, as post-training
# quantization guides calibrate on (PyTorch's static quantization tutorial: 32 batches of
# 10; Intel Neural Compressor's default: 100 samples); docs/DEPLOY.md has the agreement.
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Calibration:
    """Where calibration images come from: ``images`` of ``source``'s ``split`` (a ``--data``
    source), drawn with ``seed`` (a streamed source gives its first ones)."""

    source: str
    images: int = CALIBRATION_IMAGES
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"calibration images must be at least 1, got {self.images}")
        if self.split not in SPLITS:
            raise ValueError(f"calibration split must be one of {SPLITS}, got {self.split!r}")


def calibration_batches(calibration: Calibration, loaded: LoadedModel) -> Iterator[torch.Tensor]:
    """The calibration images as batches the loaded model takes (its evaluation transform),
    read as they are used; a ``ValueError`` where none can be read. A source that is one
    split (a folder of class folders, a list without a split column) gives its images."""
    source = open_source(calibration.source)
    transform = eval_transform(loaded.settings)
    if source.single_split:
        where = f"{source} (one split)"
        dataset = source.eval_split(transform, None)
    else:
        where = f"the {calibration.split} split of {source}"
        dataset = source.split(calibration.split, transform)
    if is_streamed(dataset):
        dataset = take(dataset, calibration.images)
    elif len(dataset) > calibration.images:  # a sample over all classes, not the first few
        picked = random.Random(calibration.seed).sample(range(len(dataset)), calibration.images)
        dataset = Subset(dataset, sorted(picked))
    count = 0
    for images, _, _ in make_loader(dataset, CALIBRATION_BATCH).loader:
        if len(images):
            count += len(images)
            yield images
    if count == 0:
        raise ValueError(f"calibration: no readable image in {where}")
    logger.info("calibration: %d images from %s", count, where)


def prepare_loaded(
    loaded: LoadedModel,
    precision: str,
    device: torch.device,
    calibration: Calibration | None = None,
) -> PreparedModel:
    """:func:`cait.precision.prepare_model` for a loaded checkpoint; ``calibration`` (int8
    only: a one-line ``ValueError`` for another precision) fixes int8's activation scales
    from images read through ``loaded.settings``' evaluation transform (nothing is read
    before the precision is checked, nor where the int8 engine cannot use them)."""
    if calibration is not None and precision != "int8":
        raise ValueError(f"calibration is for precision int8, not {precision}")
    batches = None if calibration is None else calibration_batches(calibration, loaded)
    return prepare_model(loaded.model, precision, device, batches)
