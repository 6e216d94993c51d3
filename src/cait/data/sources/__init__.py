"""Data sources behind one seam: ``--data`` names one, and every command (``train``,
``eval``, ``ablate``, ``predict``, ``shards``, ``bench``) opens it here.

| ``--data``      | source                                                     | module      |
|-----------------|------------------------------------------------------------|-------------|
| ``digits``      | scikit-learn's bundled digits                              | digits      |
| ``DIR``         | an ImageFolder tree (``train/``, ``val/``)                 | folder      |
| ``shards:DIR``  | tar shards in the WebDataset layout, streamed              | shards      |
| ``hf:DIR``      | a ``datasets`` folder (``save_to_disk``) or parquet files  | hf          |
| ``list:FILE``   | a CSV or JSON Lines manifest (``path,label[,split]``)      | manifest    |

A new source is one module with a :class:`~cait.data.sources.base.Source` subclass and its
prefix in ``PREFIXES`` below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from cait.data.sources.base import SPLITS, KeyedSample, Sample, Source, SplitName
from cait.data.sources.digits import DIGITS, DigitsDataset, DigitsSource, export_digits
from cait.data.sources.folder import FolderSource, ImageFolderDataset
from cait.data.sources.hf import HFSource
from cait.data.sources.manifest import ListSource
from cait.data.sources.shards import ShardSource, ShardStream

__all__ = [
    "DIGITS",
    "PREFIXES",
    "SPLITS",
    "DigitsDataset",
    "ImageFolderDataset",
    "Sample",
    "ShardStream",
    "Source",
    "SplitName",
    "build_datasets",
    "build_val_dataset",
    "export_digits",
    "is_streamed",
    "keyed",
    "open_source",
    "open_split",
]

PREFIXES: dict[str, type[Source]] = {
    "shards": ShardSource,
    "hf": HFSource,
    "list": ListSource,
}
SOURCE_HELP = "digits, a folder, shards:DIR, hf:DIR or list:FILE"


def open_source(text: str) -> Source:
    """The source ``text`` names (``digits``, ``DIR``, ``shards:DIR``, ``hf:DIR``,
    ``list:FILE``); a missing location or an unreadable index is a one-line error."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"--data must name a source ({SOURCE_HELP}), got {text!r}")
    if text == DIGITS:
        return DigitsSource()
    prefix, colon, location = text.partition(":")
    if colon and prefix in PREFIXES:
        if not location:
            raise ValueError(f"{text}: name a location after {prefix}:")
        return PREFIXES[prefix](location)
    return FolderSource(text)


def build_datasets(
    path: str, train_tf: Callable | None, eval_tf: Callable | None
) -> tuple[Any, Any, list[str]]:
    """The training and validation splits of a source (the validation split labelled by
    training's class names) and the class names."""
    source = open_source(path)
    source.check_splits()
    if source.single_split:
        raise ValueError(f"{source} is one split (for cait eval); training needs train and val")
    train = source.split("train", train_tf, train=True)
    val = source.split("val", eval_tf, classes=train.classes)
    source.check_disjoint(train, val)
    return train, val, list(train.classes)


def build_val_dataset(path: str, eval_tf: Callable, classes: Sequence[str] | None = None) -> Any:
    """The split ``cait eval`` reads: a source's validation split (a folder: ``DIR/val``,
    or ``DIR`` itself when it holds class folders), labelled by ``classes`` when given."""
    return open_source(path).eval_split(eval_tf, classes)


def open_split(
    text: str,
    split: str,
    transform: Callable | None,
    classes: Sequence[str] | None = None,
    with_keys: bool = False,
) -> Any:
    """One split of a source, read as evaluation reads it (every sample once, an unreadable
    one reported, not replaced): ``train``, ``val``, or ``eval`` (what ``cait eval`` reads).
    ``with_keys``: its samples carry their keys (:func:`keyed`)."""
    source = open_source(text)
    if split == "eval":
        dataset = source.eval_split(transform, classes)
    elif split in SPLITS:
        dataset = source.split(split, transform, classes)
    else:
        raise ValueError(f"split must be train, val or eval, got {split!r}")
    return keyed(dataset) if with_keys else dataset


class KeyedDataset(Dataset):
    """An indexed split whose samples carry their keys: ``(image, label, skipped, key)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.classes = dataset.classes
        self.skipped = getattr(dataset, "skipped", [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> KeyedSample:
        return (*self.dataset[index], self.dataset.key(index))


def keyed(dataset: Any) -> Any:
    """``dataset`` with keys in its samples (a streamed split is told to add them)."""
    if is_streamed(dataset):
        dataset.keyed = True
        return dataset
    return KeyedDataset(dataset)


def is_streamed(dataset: Any) -> bool:
    """Whether a split is streamed (it plans its own order) rather than indexed."""
    return isinstance(dataset, ShardStream)
