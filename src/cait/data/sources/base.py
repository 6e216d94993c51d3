"""What every data source gives: a split as a dataset of keyed samples, its class names, the
files it left out, and (for streamed sources) a plan of what each rank and loader worker
reads in an epoch.

A sample is ``(image, label, skipped)``: the image (transformed; ``None`` for an unreadable
one in evaluation), its label as an index into the split's ``classes``, and the
descriptions of the files it had to skip. Every sample also has a key naming it within its
source (a file's path, ``SHARD#MEMBER``, ``hf:DIR[split][row]``), for results files and
exactly-once counts: an indexed split's ``key(i)``; a keyed split (:func:`keyed`) yields
``(image, label, skipped, key)``.

**A transform that decodes itself** (``transform.decodes_itself = True``, as
:func:`cait.data.transforms.fast_train_transform` sets it) is handed each image opened but
not decoded (:func:`cait.data.decode.open_image` on the file, or on the bytes of a tar
member or a parquet cell), so that it can decode at the scale its crop needs; the errors
of decoding (``UNREADABLE_IMAGE_ERRORS``) then come from the transform and are named skips
as before. Other transforms get the decoded upright RGB image (:mod:`cait.data.images`);
so do all transforms of sources without files (digits).

Two kinds of split:
- **indexed** (map-style: digits, folders, lists, Hugging Face folders): ``dataset[i]``
  reads sample ``i``; the samplers of :mod:`cait.data.samplers` decide the order;
- **streamed** (tar shards): an ``IterableDataset`` that reads shard after shard; it plans
  its own order from ``(seed, epoch)`` (:mod:`cait.data.sources.shards`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal

from PIL import Image
from torch.utils.data import Dataset

from cait.data.decode import EncodedJpeg, open_image
from cait.data.images import UNREADABLE_IMAGE_ERRORS, PixelsUnreadable, decode_image_bytes
from cait.files import first_line

__all__ = [
    "SPLITS",
    "IndexedSplit",
    "KeyedSample",
    "Sample",
    "Source",
    "SplitName",
    "class_mapping",
    "decodes_itself",
    "read_sample",
]

logger = logging.getLogger(__name__)

SplitName = Literal["train", "val"]
SPLITS: tuple[SplitName, ...] = ("train", "val")
Sample = tuple[Any, int, tuple[str, ...]]
KeyedSample = tuple[Any, int, tuple[str, ...], str]


class Source(ABC):
    """A dataset on disk with a training and a validation split, named on the command line
    as ``PREFIX:LOCATION`` (``digits`` and a bare folder have no prefix)."""

    #: the command-line prefix ("shards", "hf", "list"); "" for a folder, "digits" for digits
    prefix: str = ""

    def __init__(self, location: str) -> None:
        self.location = location

    def __str__(self) -> str:
        return f"{self.prefix}:{self.location}" if self.prefix else self.location

    @abstractmethod
    def split(
        self,
        name: SplitName,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        train: bool = False,
    ) -> Any:
        """The split ``name`` as a dataset of :data:`Sample`. ``classes``: label the
        samples by these names (training's), refusing a class it does not have;
        ``train``: a training split (an unreadable sample is replaced by a readable one, so
        that batches keep their size; in evaluation it is left out and reported)."""

    @property
    def single_split(self) -> bool:
        """Whether the source is one split (for ``cait eval``), not a training set."""
        return False

    def eval_split(self, transform: Callable | None, classes: Sequence[str] | None) -> Any:
        """The split ``cait eval`` reads: the validation split."""
        return self.split("val", transform, classes)

    def check_splits(self) -> None:  # noqa: B027 (most find out when a split is opened)
        """Refuse, before any split is read, a source that lacks a training or validation
        split (where that is cheap to tell)."""

    def check_disjoint(self, train: Any, val: Any) -> None:  # noqa: B027 (most have nothing to check)
        """Refuse a validation split that shares files with training (where it can)."""


def decodes_itself(transform: Callable | None) -> bool:
    """Whether ``transform`` takes images opened but not decoded (its ``decodes_itself``)."""
    return getattr(transform, "decodes_itself", False) is True


class IndexedSplit(Dataset):
    """An indexed split: sample ``i`` is ``_read(i)`` (the image, or why it cannot be read)
    through ``transform``, labelled ``targets[i]``; for a transform that decodes itself,
    ``_open(i)`` (the image opened, not decoded) through it. ``substitute`` (training): an
    unreadable sample is replaced by the next readable one, its problem named, so that
    batches keep their size; otherwise (evaluation) it has no image and the problem is
    named."""

    targets: list[int]
    transform: Callable | None = None
    substitute: bool = False

    def _read(self, index: int) -> tuple[Image.Image | None, str]:
        raise NotImplementedError

    def _open(self, index: int) -> Image.Image | EncodedJpeg:
        """Sample ``index``'s image opened but not decoded; raises one of
        ``UNREADABLE_IMAGE_ERRORS`` when it cannot be opened."""
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def _transformed(self, index: int) -> tuple[Any, str]:
        """Sample ``index`` through the transform: ``(image, "")``, or ``(None, problem)``."""
        if decodes_itself(self.transform):
            try:
                img = self._open(index)
            except UNREADABLE_IMAGE_ERRORS as err:
                return None, f"{self.key(index)}: {first_line(err)}"
            return _decoded_by(self.transform, img, self.key(index))
        img, problem = self._read(index)
        if img is not None and self.transform is not None:
            img = self.transform(img)
        return img, problem

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        skipped: list[str] = []
        for offset in range(len(self.targets)):
            i = (index + offset) % len(self.targets)
            img, problem = self._transformed(i)
            if not problem:
                return img, self.targets[i], tuple(skipped)
            skipped.append(problem)
            if not self.substitute:
                return None, self.targets[index], tuple(skipped)
        raise ValueError(f"{self}: no readable image among its {len(self.targets)} samples")


def class_mapping(own: Sequence[str], given: Sequence[str] | None, where: str) -> list[int]:
    """For each of a split's own classes, its index among ``given`` (training's classes);
    the identity without ``given``. A class ``given`` lacks is a one-line error."""
    if given is None:
        return list(range(len(own)))
    index = {name: i for i, name in enumerate(given)}
    extra = [name for name in own if name not in index]
    if extra:
        raise ValueError(f"{where} has classes not in training: {sorted(extra)[:10]}")
    return [index[name] for name in own]


def read_sample(
    data: bytes, key: str, transform: Callable | None = None
) -> tuple[Image.Image | Any | None, str]:
    """Decode (and transform) one sample's image bytes: ``(image, "")``, or ``(None,
    problem)`` naming ``key`` when the bytes are not a whole image. A transform that decodes
    itself is given the image opened, not decoded, and its decoding errors are the
    problem."""
    try:
        img = open_image(data) if decodes_itself(transform) else decode_image_bytes(data)
    except UNREADABLE_IMAGE_ERRORS as err:
        return None, f"{key}: {first_line(err)}"
    if decodes_itself(transform):
        return _decoded_by(transform, img, key)
    return (transform(img) if transform is not None else img), ""


def _decoded_by(transform: Callable, img: Image.Image | EncodedJpeg, key: str) -> tuple[Any, str]:
    """``img`` (opened, not decoded) through a transform that decodes itself: ``(sample,
    "")``, or ``(None, problem)`` when its pixels cannot be decoded. Only that
    (:class:`~cait.data.images.PixelsUnreadable`) is a skip: any other error of the
    transform is a bug, and is raised."""
    with img:  # closes the file, whatever the transform did
        try:
            return transform(img), ""
        except PixelsUnreadable as err:
            return None, f"{key}: {first_line(err)}"
