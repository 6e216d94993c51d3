"""``list:FILE``: a manifest of images, CSV (a header row ``path,label[,split]``) or JSON Lines
(one object per line with ``path``, ``label`` and optionally ``split``).

Paths are relative to the manifest's folder (absolute ones are taken as they are); labels
are class names; ``split`` is ``train`` or ``val``. The classes are the training rows'
labels, sorted (as a folder's class folders are). Without a ``split`` column the whole list
is one split, which ``cait eval``, ``predict`` and ``ablate`` read; training needs both.

A row naming a missing or unreadable file is a named skip (reported, counted in
``skipped_files.txt``); a malformed row, a validation label training does not have, or a
split with no readable image is a one-line error naming the file and line.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cait.data.decode import EncodedJpeg, open_image
from cait.data.images import UNREADABLE_IMAGE_ERRORS, load_image, read_bytes
from cait.data.sources.base import SPLITS, IndexedSplit, Source, SplitName, class_mapping
from cait.files import first_line

__all__ = ["ListDataset", "ListSource", "read_manifest"]

logger = logging.getLogger(__name__)

# A manifest is read whole: refuse one that could not be a list of images (1 GiB of text
# is about ten million rows, ten ImageNets).
MAX_MANIFEST_BYTES = 1 << 30
COLUMNS = ("path", "label")
OPTIONAL = ("split",)


@dataclass(frozen=True)
class Row:
    path: Path
    label: str
    split: str | None
    line: int


def _check_row(values: dict, file: Path, line: int, has_split: bool) -> Row:
    missing = [c for c in COLUMNS + (OPTIONAL if has_split else ()) if c not in values]
    if missing:
        raise ValueError(f"{file}:{line}: no {', '.join(missing)} (expected path,label[,split])")
    path, label = values["path"], values["label"]
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)  # JSON Lines may give numbers as class names
    if not isinstance(path, str) or not path or not isinstance(label, str) or not label:
        raise ValueError(f"{file}:{line}: path and label must be non-empty text")
    split = values.get("split") if has_split else None
    if has_split and split not in SPLITS:
        raise ValueError(f"{file}:{line}: split must be train or val, got {split!r}")
    full = Path(path).expanduser()
    return Row(full if full.is_absolute() else file.parent / full, label, split, line)


def _records(file: Path) -> tuple[list[tuple[int, dict]], bool]:
    """The manifest's rows as dicts with their line numbers, and whether it has splits."""
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".jsonl", ".ndjson"):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{number}: not JSON ({err.msg})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{file}:{number}: expected an object, got {type(value).__name__}")
            records.append((number, value))
        return records, any("split" in r for _, r in records)
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    if not set(COLUMNS) <= set(header):
        raise ValueError(f"{file}: its header is {header}; expected path,label[,split]")
    return [(number, row) for number, row in enumerate(reader, 2)], "split" in header


def read_manifest(file: str | Path) -> tuple[list[Row], bool]:
    """The rows of a manifest (checked) and whether they carry a split."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"list file not found: {file}")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{file}: over {MAX_MANIFEST_BYTES >> 30} GiB: not a manifest")
    if file.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise ValueError(f"{file}: a list is a .csv or .jsonl file")
    try:
        records, has_split = _records(file)
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not UTF-8 text") from None
    except csv.Error as err:
        raise ValueError(f"{file}: not CSV ({err})") from None
    rows = [_check_row(values, file, line, has_split) for line, values in records]
    if not rows:
        raise ValueError(f"{file}: no rows")
    return rows, has_split


class ListDataset(IndexedSplit):
    """The rows of one split; ``substitute`` as in a folder (training replaces an unreadable
    sample by the next readable one, evaluation leaves it out and reports it)."""

    def __init__(
        self,
        rows: Sequence[Row],
        classes: Sequence[str],
        where: str,
        transform: Callable | None = None,
        substitute: bool = False,
    ) -> None:
        own = sorted({r.label for r in rows})
        mapping = dict(zip(own, class_mapping(own, classes, where), strict=True))
        self.classes = list(classes)
        present = [r.path.is_file() for r in rows]
        self.rows = [r for r, there in zip(rows, present, strict=True) if there]
        self.skipped = [
            f"{r.path}: listed at line {r.line}, no such file"
            for r, there in zip(rows, present, strict=True)
            if not there
        ]
        if self.skipped:
            logger.warning("%s: %d listed file(s) not found, left out", where, len(self.skipped))
        if not self.rows:
            raise ValueError(f"{where}: none of its {len(rows)} listed files exists")
        self.targets = [mapping[r.label] for r in self.rows]
        self.where = where
        self.transform = transform
        self.substitute = substitute

    def __str__(self) -> str:
        return self.where

    def key(self, index: int) -> str:
        return str(self.rows[index].path)

    def encoded(self) -> Iterator[tuple[str, bytes | str, int]]:
        """Every sample as ``(key, the file's bytes or why not, label)``."""
        for row, label in zip(self.rows, self.targets, strict=True):
            yield str(row.path), read_bytes(row.path), label

    def _read(self, index: int) -> tuple[Image.Image | None, str]:
        path = self.rows[index].path
        try:
            return load_image(path), ""
        except UNREADABLE_IMAGE_ERRORS as err:
            return None, f"{path}: {first_line(err)}"

    def _open(self, index: int) -> Image.Image | EncodedJpeg:
        return open_image(self.rows[index].path)


class ListSource(Source):
    prefix = "list"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.rows, self.has_split = read_manifest(location)

    @property
    def single_split(self) -> bool:
        return not self.has_split

    def _rows(self, name: SplitName) -> list[Row]:
        if not self.has_split:
            raise ValueError(
                f"{self.location} has no split column: it is one split, for cait eval, "
                "predict and ablate; training needs rows with split train and val"
            )
        rows = [r for r in self.rows if r.split == name]
        if not rows:
            raise ValueError(f"{self.location} has no rows with split {name}")
        return rows

    def split(
        self,
        name: SplitName,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        train: bool = False,
    ) -> ListDataset:
        rows = self._rows(name)
        if classes is None:
            classes = sorted({r.label for r in rows})
        return ListDataset(rows, classes, f"{self} ({name})", transform, substitute=train)

    def eval_split(self, transform: Callable | None, classes: Sequence[str] | None) -> ListDataset:
        rows = self._rows("val") if self.has_split else self.rows
        if classes is None:
            classes = sorted({r.label for r in rows})
        return ListDataset(rows, classes, str(self), transform)
