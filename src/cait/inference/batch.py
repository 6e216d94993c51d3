"""Prediction over many images: batched, with loader workers and a progress bar, into a
results file (:mod:`cait.inference.results`) that a stopped run resumes.

The loop takes any dataset whose items are ``(image, label, skipped, key)``: the image
tensor (``None`` for a file that could not be read, described in ``skipped``), its label
(``-1`` when unknown) and the key that names it in the results (its path). Image files and
folders make one (:class:`ImageFiles`); a ``--data`` source
(:func:`cait.data.open_split` with keys) another, whose labels fill a ``label`` column.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from cait import runtime
from cait.data import collate_keyed, eval_transform, open_split
from cait.data.datasets import find_images
from cait.data.sources import is_streamed
from cait.data.sources.base import KeyedSample
from cait.files import first_line
from cait.inference.calibration import Calibration, prepare_loaded
from cait.inference.image import patch_size, read_checked_image
from cait.inference.results import ResultsJournal
from cait.models.build import LoadedModel, load_for_inference
from cait.precision import PreparedModel
from cait.progress import progress_bar
from cait.threads import adapt as adapt_threads

__all__ = [
    "ImageFiles",
    "list_images",
    "predict_batches",
    "predict_to_file",
    "result_row",
]

logger = logging.getLogger(__name__)


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files as named, and every image under each folder (sorted); a missing path is a
    one-line ``FileNotFoundError``."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = find_images(path)
            if not found:
                logger.warning("%s: no image files in this folder", path)
            files += found
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {item}")
    return files


class ImageFiles(Dataset):
    """Image files as keyed samples: each read and checked as ``cait predict`` reads one
    (:func:`~cait.inference.image.read_checked_image`); one it cannot use is skipped with
    its reason."""

    def __init__(self, files: Sequence[Path], transform: Callable, patch: int = 1) -> None:
        self.files, self.transform, self.patch = list(files), transform, patch

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return str(self.files[index])

    def __getitem__(self, index: int) -> KeyedSample:
        path = self.files[index]
        try:
            image = read_checked_image(path, self.patch)
        except (ValueError, OSError) as err:
            return None, -1, (first_line(err),), str(path)
        return self.transform(image), -1, (), str(path)


def result_row(
    key: str, probs: Tensor, indices: Tensor, names: Sequence[str] | None, label: str | None
) -> dict[str, Any]:
    """One results row: ``path``, ``top1``, ``prob1``, ... ``topK``, ``probK`` (the model's
    class names), then ``label`` (the source's class name) when the image has one."""
    row: dict[str, Any] = {"path": key}
    for rank, (p, i) in enumerate(zip(probs.tolist(), indices.tolist(), strict=True), 1):
        row[f"top{rank}"] = names[i] if names else str(i)
        row[f"prob{rank}"] = round(p, 6)
    if label is not None:
        row["label"] = label
    return row


def _label_name(label: int, classes: Sequence[str] | None) -> str | None:
    if label < 0:
        return None
    return classes[label] if classes and label < len(classes) else str(label)


@torch.no_grad()
def predict_batches(
    prepared: PreparedModel,
    dataset: Dataset,
    names: Sequence[str] | None,
    topk: int = 5,
    batch_size: int = 64,
    workers: int = 0,
    stats: dict[str, Any] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The rows of each batch of ``dataset`` (keyed samples; its ``classes``, when it has
    them, name the labels), in order. ``stats`` gets
    ``images``, ``skipped`` (descriptions) and ``images_per_s`` (after the first batch, as
    :func:`cait.training.engine.evaluate` counts it)."""
    stats = {} if stats is None else stats
    stats.update(images=0, skipped=[], images_per_s=0.0)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_keyed
    )
    device = next(prepared.model.parameters(), torch.empty(0)).device
    classes = getattr(dataset, "classes", None) or getattr(
        getattr(dataset, "dataset", None), "classes", None
    )
    start, warm_images = time.perf_counter(), 0
    with progress_bar(len(loader), "predict") as bar:
        for images, labels, skipped, keys in loader:
            bar.update(1)
            adapt_threads()
            stats["skipped"] += skipped
            if not keys:
                continue
            with prepared.autocast():
                logits = prepared.model(images.to(device))
            probs, indices = logits.float().softmax(-1).topk(min(topk, logits.shape[-1]))
            yield [
                result_row(k, p, i, names, _label_name(int(label), classes))
                for k, p, i, label in zip(keys, probs, indices, labels, strict=True)
            ]
            stats["images"] += len(keys)
            if warm_images == 0:  # the warm-up batch: the timed figure starts after it
                start, warm_images = time.perf_counter(), len(keys)
    timed = stats["images"] - warm_images
    elapsed = time.perf_counter() - start
    stats["images_per_s"] = timed / elapsed if timed and elapsed > 0 else 0.0


def _prepare(
    checkpoint: str,
    model_name: str | None,
    device: str,
    precision: str,
    calibration: Calibration | None,
) -> tuple[LoadedModel, PreparedModel]:
    dev = runtime.inference_device(device, "none")
    loaded = load_for_inference(checkpoint, model_name)
    prepared = prepare_loaded(loaded, precision, dev, calibration)
    return dataclasses.replace(loaded, model=prepared.model), prepared


def _dataset(
    loaded: LoadedModel, inputs: Sequence[str | Path], data: str | None, split: str
) -> Dataset:
    """The keyed samples to predict: image files and folders, or a ``--data`` source's split."""
    transform = eval_transform(loaded.settings)
    if data is not None:
        return open_split(data, split, transform, with_keys=True)
    return ImageFiles(list_images(inputs), transform, patch_size(loaded.model))


def _remaining(dataset: Dataset, done: set[str]) -> Dataset:
    """``dataset`` without the samples whose keys are ``done``. An indexed split is read by
    index (nothing done is read again); a streamed one is read whole, and the rows of done
    keys are dropped when written (:meth:`ResultsJournal.append`)."""
    if is_streamed(dataset) or not done:
        return dataset
    inner = getattr(dataset, "dataset", dataset)  # a keyed split wraps the indexed one
    todo = [i for i in range(len(dataset)) if str(inner.key(i)) not in done]
    logger.info("%d of %d images to predict", len(todo), len(dataset))
    subset = Subset(dataset, todo)
    subset.classes = getattr(dataset, "classes", None)  # type: ignore[attr-defined]
    return subset


def predict_to_file(
    checkpoint: str,
    inputs: Sequence[str | Path] = (),
    output: str | Path | None = None,
    topk: int = 5,
    model_name: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 64,
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
    data: str | None = None,
    split: str = "eval",
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Predict every image of ``inputs`` (files and folders), or of the ``split`` of source
    ``data`` (``digits``, a folder, ``shards:DIR``, ``hf:DIR``, ``list:FILE``; its labels
    fill a ``label`` column), in batches, into ``output`` (``.csv``, ``.jsonl`` or
    ``.parquet``; see :mod:`cait.inference.results`) and/or to ``on_rows``. With ``resume``
    the rows a stopped run wrote are kept and their images not run again. Returns
    ``images`` (run now), ``rows`` (in the output), ``skipped`` and ``images_per_s``.
    ``calibration`` fixes int8's activation scales (:mod:`cait.inference.calibration`)."""
    if resume and output is None:
        raise ValueError("--resume continues a results file: give --output")
    if (data is None) == (not inputs):
        raise ValueError("give image files or folders, or --data SOURCE (one of the two)")
    if data is None:
        list_images(inputs)  # a missing path fails before the model loads
    stats: dict[str, Any] = {}
    if output is None:
        loaded, prepared = _prepare(checkpoint, model_name, device, precision, calibration)
        dataset = _dataset(loaded, inputs, data, split)
        for rows in predict_batches(
            prepared, dataset, loaded.class_names, topk, batch_size, workers, stats
        ):
            if on_rows is not None:
                on_rows(rows)
        return {**stats, "rows": stats["images"], "output": None}
    # the output is checked (and locked) before the model loads: a refusal costs nothing
    with ResultsJournal(output, resume=resume, overwrite=overwrite) as journal:
        loaded, prepared = _prepare(checkpoint, model_name, device, precision, calibration)
        dataset = _remaining(_dataset(loaded, inputs, data, split), journal.done)
        for rows in predict_batches(
            prepared, dataset, loaded.class_names, topk, batch_size, workers, stats
        ):
            journal.append(rows)
            if on_rows is not None:
                on_rows(rows)
        written = journal.finish()
    if stats["skipped"]:
        logger.warning(
            "skipped %d unreadable file(s):\n  %s",
            len(stats["skipped"]),
            "\n  ".join(stats["skipped"]),
        )
    return {**stats, "rows": len(written), "output": str(output)}
