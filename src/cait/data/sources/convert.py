"""Any source written in another source's form: a folder tree, a list file, a Hugging Face
``datasets`` folder (and tar shards, :mod:`cait.data.sources.shard_writer`). The benchmarks
and tests use it to feed the same images through every source; a user can turn a folder
into a manifest or a ``datasets`` folder the same way.

Every split keeps its images' encoded bytes (a JPEG stays the same JPEG) and is written
with the training split's class names.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from cait.data.sources.base import Source
from cait.data.sources.shard_writer import EXTENSIONS, write_shards
from cait.files import write_folder_atomically

__all__ = ["FORMS", "write_as"]

FORMS = ("folder", "list", "hf", "shards")


def _readable(source: Source) -> Iterator[tuple[str, str, str, bytes]]:
    """``(split, class name, extension, bytes)`` of every readable image of both splits."""
    train = source.split("train")
    classes = train.classes
    for split, dataset in (("train", train), ("val", source.split("val", classes=classes))):
        for _, data, label in dataset.encoded():
            if isinstance(data, str):
                continue
            try:
                with Image.open(io.BytesIO(data)) as img:
                    extension = EXTENSIONS.get(img.format or "", "png")
            except (OSError, ValueError):
                continue
            yield split, classes[label], extension, data


def _write_tree(source: Source, folder: Path, manifest: bool) -> None:
    rows = []
    for i, (split, name, extension, data) in enumerate(_readable(source)):
        relative = Path(split) / name / f"{i:08d}.{extension}"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
        rows.append({"path": relative.as_posix(), "label": name, "split": split})
    if manifest:
        with open(folder / "list.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
            writer.writeheader()
            writer.writerows(rows)


def _write_hf(source: Source, folder: Path) -> None:
    import datasets

    records: dict[str, dict[str, list]] = {}
    classes = source.split("train").classes
    for split, name, _, data in _readable(source):
        columns = records.setdefault(split, {"image": [], "label": []})
        columns["image"].append({"bytes": data, "path": None})
        columns["label"].append(classes.index(name))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))}
    )
    splits = {
        "train" if split == "train" else "validation": datasets.Dataset.from_dict(
            columns, features=features
        )
        for split, columns in records.items()
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))


def write_as(source: Source, form: str, output: str | Path) -> str:
    """Write ``source``'s training and validation splits as ``form`` (one of
    :data:`FORMS`) at ``output`` (which must not exist); returns the ``--data`` text that
    names what was written."""
    output = Path(output)
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if os.path.lexists(output):
        raise FileExistsError(f"{output} exists")
    if form == "shards":
        write_shards(source, output)
        return f"shards:{output}"
    if form == "hf":
        write_folder_atomically(output, lambda folder: _write_hf(source, folder / "dataset"))
        return f"hf:{output / 'dataset'}"
    write_folder_atomically(output, lambda folder: _write_tree(source, folder, form == "list"))
    return f"list:{output / 'list.csv'}" if form == "list" else str(output)
