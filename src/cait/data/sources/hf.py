"""``hf:DIR``: a Hugging Face ``datasets`` folder written by ``save_to_disk``, or a folder of
parquet files (the Hub's layout, ``data/train-00000-of-00004.parquet``), read from disk.

Splits: a ``save_to_disk`` folder's ``train``, and ``validation`` (else ``val``, else
``test``); parquet files go by the words in their path (``train``; ``validation``,
``valid`` or ``val``, else ``test``). A single ``Dataset`` (no splits) is one split, for
``cait eval``, ``predict`` and ``ablate``.

Columns: the image is the column typed ``Image`` (else one named ``image``, ``img``,
``jpg``, ``png``), holding encoded bytes; the label is the ``ClassLabel`` column (else
``label``, ``labels``, ``cls``, ``target``), whose names are the classes (integers without
names are the classes ``0`` .. ``K-1``). Wrong columns and labels out of range are one-line
errors; an image that does not decode is a named skip.

Parquet is read a row group at a time (two kept per loader worker): in order, that is one
read per group; shuffled training over large parquet files reads a group per image, so turn
them into shards first (``cait shards hf:DIR OUT``). ``save_to_disk`` folders are
memory-mapped Arrow files, read per row.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cait.data.decode import EncodedJpeg, open_image
from cait.data.sources.base import IndexedSplit, Source, SplitName, class_mapping, read_sample

__all__ = ["HFDataset", "HFSource"]

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "cls", "target")
VAL_NAMES = (("validation", "valid", "val"), ("test",))  # in order of preference
# Row groups a worker keeps decoded (parquet): the one being read and the one before it.
CACHED_GROUPS = 2
MAX_CLASSES = 1_000_000  # a label column's largest value beyond this is not a class count


def _features(schema: Any) -> dict:
    """The ``datasets`` features stored in an Arrow/parquet schema's metadata ({} if none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _columns(schema: Any, where: str) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and the class names (if the schema names them)."""
    features = _features(schema)
    names = list(schema.names)

    def typed(kind: str) -> str | None:
        return next((n for n in names if (features.get(n) or {}).get("_type") == kind), None)

    image = typed("Image") or next((n for n in IMAGE_COLUMNS if n in names), None)
    label = typed("ClassLabel") or next((n for n in LABEL_COLUMNS if n in names), None)
    if image is None or label is None:
        raise ValueError(
            f"{where}: its columns are {names}; expected an image column "
            f"({', '.join(IMAGE_COLUMNS)} or an Image feature) and a label column "
            f"({', '.join(LABEL_COLUMNS)} or a ClassLabel)"
        )
    classes = (features.get(label) or {}).get("names")
    if classes is not None and not (
        isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)
    ):
        raise ValueError(f"{where}: the ClassLabel of column {label} has no usable names")
    return image, label, classes


def _split_of(path: Path, root: Path) -> str | None:
    words = set(re.split(r"[^a-z]+", str(path.relative_to(root)).lower()))
    if "train" in words:
        return "train"
    for rank, group in enumerate(VAL_NAMES):
        if words & set(group):
            return f"val{rank}"
    return None


def _datasets_library() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "reading a datasets folder needs the datasets library: pip install 'cait[data]'"
        ) from None
    return datasets


class _Rows:
    """Rows of one split, read lazily in each process: ``save_to_disk`` Arrow (through
    ``datasets``) or parquet files (through pyarrow, a row group at a time)."""

    def __init__(self, arrow_folder: Path | None, parquet: Sequence[Path], where: str) -> None:
        self.arrow_folder, self.parquet, self.where = arrow_folder, list(parquet), where
        self._pid: int | None = None
        schema, self.groups = self._open_schema()
        self.image, self.label, self.names = _columns(schema, where)
        self.length = (
            sum(rows for _, _, rows in self.groups) if self.parquet else len(self._arrow())
        )

    def _open_schema(self) -> tuple[Any, list[tuple[int, int, int]]]:
        if self.arrow_folder is not None:
            return self._arrow().data.schema, []
        import pyarrow.parquet as pq

        groups, schema = [], None
        for f, path in enumerate(self.parquet):
            try:
                meta = pq.ParquetFile(path)
            except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"{path}: not a parquet file ({err})") from None
            schema = schema or meta.schema_arrow
            if meta.schema_arrow.names != schema.names:
                raise ValueError(f"{path}: its columns differ from {self.parquet[0]}'s")
            groups += [
                (f, g, meta.metadata.row_group(g).num_rows) for g in range(meta.num_row_groups)
            ]
        return schema, groups

    def _arrow(self) -> Any:
        if self._pid != os.getpid():  # memory maps and file handles are per process
            self._pid, self._cache = os.getpid(), OrderedDict()
            if self.arrow_folder is not None:
                datasets = _datasets_library()

                self._dataset = datasets.load_from_disk(str(self.arrow_folder))
        return self._dataset if self.arrow_folder is not None else None

    def labels(self) -> np.ndarray:
        if self.arrow_folder is not None:
            return np.asarray(self._arrow().data.column(self.label).to_numpy())
        import pyarrow.parquet as pq

        return np.concatenate(
            [pq.read_table(p, columns=[self.label])[self.label].to_numpy() for p in self.parquet]
        )

    def image_bytes(self, index: int) -> bytes | None:
        if self.arrow_folder is not None:
            cell = self._arrow().data.column(self.image)[index].as_py()
        else:
            cell = self._parquet_cell(index)
        if isinstance(cell, dict):  # the Image feature: {"bytes": ..., "path": ...}
            cell = cell.get("bytes")
        return cell if isinstance(cell, bytes) else None

    def _parquet_cell(self, index: int) -> Any:
        self._arrow()  # resets the cache in a new process
        if not hasattr(self, "_starts"):
            self._starts = np.cumsum([0] + [rows for _, _, rows in self.groups]).tolist()
        group = bisect.bisect_right(self._starts, index) - 1
        file, number, _ = self.groups[group]
        if group not in self._cache:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.parquet[file]).read_row_group(number, columns=[self.image])
            self._cache[group] = table.column(self.image)
            while len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
        return self._cache[group][index - self._starts[group]].as_py()


class HFDataset(IndexedSplit):
    """One split: rows decoded through :func:`read_sample`; ``substitute`` as in a folder."""

    def __init__(
        self,
        rows: _Rows,
        transform: Callable | None,
        classes: Sequence[str] | None,
        substitute: bool,
    ) -> None:
        self.rows, self.transform, self.substitute = rows, transform, substitute
        labels = rows.labels()
        if len(labels) == 0:
            raise ValueError(f"{rows.where}: no rows")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{rows.where}: column {rows.label} holds {labels.dtype}, not integers"
            )
        top = len(rows.names) if rows.names else MAX_CLASSES
        bad = np.flatnonzero((labels < 0) | (labels >= top))
        if len(bad):
            raise ValueError(
                f"{rows.where}: row {bad[0]} has label {labels[bad[0]]}, outside "
                f"[0, {top}) ({len(bad)} such rows)"
            )
        own = rows.names or [str(i) for i in range(int(labels.max()) + 1)]
        mapping = np.asarray(class_mapping(own, classes, rows.where))
        self.classes = list(classes) if classes is not None else own
        self.targets = mapping[labels].tolist()
        self.skipped: list[str] = []

    def __str__(self) -> str:
        return self.rows.where

    def key(self, index: int) -> str:
        return f"{self.rows.where}[{index}]"

    def encoded(self) -> Iterator[tuple[str, bytes | str, int]]:
        """Every sample as ``(key, image bytes or why not, label)``."""
        for i, label in enumerate(self.targets):
            data = self.rows.image_bytes(i)
            yield self.key(i), data if data is not None else "no image bytes", label

    def _read(self, index: int) -> tuple[Any, str]:
        data = self.rows.image_bytes(index)
        if data is None:
            return None, f"{self.key(index)}: no image bytes in column {self.rows.image}"
        return read_sample(data, self.key(index))

    def _open(self, index: int) -> Image.Image | EncodedJpeg:
        data = self.rows.image_bytes(index)
        if data is None:
            raise ValueError(f"no image bytes in column {self.rows.image}")
        return open_image(data)


class HFSource(Source):
    prefix = "hf"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.root = Path(location).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Hugging Face dataset folder not found: {self.root}")
        self.splits = self._find_splits()

    def _find_splits(self) -> dict[str, _Rows]:
        if (self.root / "dataset_dict.json").is_file():
            try:
                names = json.loads((self.root / "dataset_dict.json").read_text())["splits"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise ValueError(f"{self.root}/dataset_dict.json: not a datasets index") from None
            val = next((n for group in VAL_NAMES for n in group if n in names), None)
            chosen = {"train": "train" if "train" in names else None, "val": val}
            return {
                split: _Rows(self.root / name, [], f"{self}[{name}]")
                for split, name in chosen.items()
                if name is not None and (self.root / name).is_dir()
            }
        if (self.root / "state.json").is_file():  # one Dataset, no splits
            return {"all": _Rows(self.root, [], str(self))}
        return self._parquet_splits()

    def _parquet_splits(self) -> dict[str, _Rows]:
        files = sorted(self.root.rglob("*.parquet"))
        if not files:
            raise ValueError(
                f"{self.root}: neither a datasets folder (dataset_dict.json, state.json) nor "
                "a folder of .parquet files"
            )
        by_split: dict[str, list[Path]] = {}
        for path in files:
            by_split.setdefault(_split_of(path, self.root) or "all", []).append(path)
        splits = {}
        if "train" in by_split:
            splits["train"] = _Rows(None, by_split["train"], f"{self}[train]")
        val = next((k for k in ("val0", "val1") if k in by_split), None)
        if val is not None:
            splits["val"] = _Rows(None, by_split[val], f"{self}[{by_split[val][0].stem}]")
        if not splits:
            splits["all"] = _Rows(None, files, str(self))
        return splits

    @property
    def single_split(self) -> bool:
        return "train" not in self.splits

    def _rows(self, name: str) -> _Rows:
        if name not in self.splits:
            have = sorted(self.splits)
            raise ValueError(f"{self} has no {name} split (it has {', '.join(have)})")
        return self.splits[name]

    def split(
        self,
        name: SplitName,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        train: bool = False,
    ) -> HFDataset:
        return HFDataset(self._rows(name), transform, classes, substitute=train)

    def eval_split(self, transform: Callable | None, classes: Sequence[str] | None) -> HFDataset:
        rows = self.splits.get("val") or self.splits.get("all") or self._rows("val")
        return HFDataset(rows, transform, classes, substitute=False)
