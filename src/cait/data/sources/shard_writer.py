"""``cait shards SRC OUT``: every split of any source written as tar shards in the WebDataset
layout, with ``index.json`` (classes, shards, sample counts), so that ``--data shards:OUT``
trains and evaluates as ``--data SRC`` does.

Every image is decoded before it is written (a file that does not decode is left out and
named in ``OUT/skipped_files.txt``); images keep their encoded bytes (a JPEG stays the same
JPEG), the digits are written as PNG. The folder is filled under a temporary name beside
``OUT`` and renamed into place when whole, so a stopped write leaves no partial ``OUT``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cait.data.images import UNREADABLE_IMAGE_ERRORS, decode_image_bytes
from cait.data.sources.base import Source
from cait.data.sources.shards import INDEX, LABEL_EXTENSION, member_name
from cait.files import OutputLock, first_line, write_folder_atomically
from cait.progress import progress_bar

__all__ = ["SKIPPED_LIST", "ShardsWritten", "write_shards"]

logger = logging.getLogger(__name__)

SKIPPED_LIST = "skipped_files.txt"
# PIL's format names -> the member's extension (the WebDataset convention: by content)
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
EXTENSIONS.update({"TIFF": "tiff", "PPM": "ppm", "MPO": "jpg"})


@dataclass
class ShardsWritten:
    """What :func:`write_shards` wrote: sample and shard counts per split, skipped files."""

    output: Path
    classes: list[str]
    samples: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _checked(data: bytes | str) -> tuple[str, bytes] | str:
    """The bytes' extension and the bytes when they decode whole, else why not."""
    if isinstance(data, str):
        return data
    try:
        decode_image_bytes(data)
        with Image.open(io.BytesIO(data)) as img:
            return EXTENSIONS.get(img.format or "", "png"), data
    except UNREADABLE_IMAGE_ERRORS as err:
        return first_line(err)


class _ShardFile:
    """One tar shard being filled, members added in the WebDataset layout."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        self.tar = tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, extension: str, data: bytes, label: int) -> None:
        for name, payload in (
            (member_name(key, extension), data),
            (member_name(key, LABEL_EXTENSION), str(label).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> dict:
        self.tar.close()
        return {"file": self.path.name, "samples": self.count}


def _write_split(
    folder: Path, split: str, records: Iterator, total: int, size: int, report: ShardsWritten
) -> list[dict]:
    shards: list[dict] = []
    current: _ShardFile | None = None
    with progress_bar(total, f"shards {split}", True) as bar:
        for key, data, label in records:
            bar.update(1)
            checked = _checked(data)
            if isinstance(checked, str):
                report.skipped.append(f"{key}: {checked}")
                continue
            if current is None or current.count == size:
                if current is not None:
                    shards.append(current.close())
                current = _ShardFile(folder / f"{split}-{len(shards):06d}.tar")
            current.add(f"{split}_{report.samples.get(split, 0):09d}", *checked, label)
            report.samples[split] = report.samples.get(split, 0) + 1
    if current is not None:
        shards.append(current.close())
    report.shards[split] = len(shards)
    return shards


def write_shards(
    source: Source, output: str | Path, shard_size: int = 1000, overwrite: bool = False
) -> ShardsWritten:
    """Write the training and validation splits of ``source`` (a source with one split:
    that split, as ``val``) to ``output``; returns what was written."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    output = Path(output)
    if os.path.lexists(output):
        if not (output.is_dir() and (output / INDEX).is_file()):
            raise FileExistsError(f"{output} exists and is not a shard folder: not replaced")
        if not overwrite:
            raise FileExistsError(f"{output} exists: pass --force to replace it")
    splits = _splits(source)
    report = ShardsWritten(output, list(splits[next(iter(splits))].classes))
    start = time.perf_counter()

    def write(folder: Path) -> None:
        index = {"classes": report.classes, "splits": {}}
        for name, dataset in splits.items():
            report.skipped += getattr(dataset, "skipped", [])  # left out when it was opened
            index["splits"][name] = _write_split(
                folder, name, dataset.encoded(), _length(dataset), shard_size, report
            )
            if not index["splits"][name]:
                raise ValueError(f"{source} ({name}): no readable image to write")
        (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        if report.skipped:
            (folder / SKIPPED_LIST).write_text("\n".join(report.skipped) + "\n")

    with OutputLock(output, "cait shards"):
        write_folder_atomically(output, write, interruptible=True)
    logger.info(
        "wrote %s in %.1f s: %s; %d file(s) skipped",
        output,
        time.perf_counter() - start,
        ", ".join(
            f"{n} {s} samples in {report.shards[s]} shards" for s, n in report.samples.items()
        ),
        len(report.skipped),
    )
    return report


def _splits(source: Source) -> dict:
    """The splits to write, labelled by the training split's classes."""
    if source.single_split:  # a list without splits, a single Dataset, a class folder
        return {"val": source.eval_split(None, None)}
    train = source.split("train")
    return {"train": train, "val": source.split("val", classes=train.classes)}


def _length(dataset: object) -> int:
    return getattr(dataset, "total", None) or len(dataset)  # type: ignore[arg-type]
