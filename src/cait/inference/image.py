"""Inference from a checkpoint: one image at a time (``cait predict IMAGE``, and the app's
model runs) and a whole validation split (``cait eval``).

One image goes one way, whoever asks: its file is checked and read
(:func:`read_checked_image`: a decompression bomb and an image smaller than one patch of the
model are refused from the header, before decoding), the model's eval transform makes its
input, and the model gives the top-k classes (:func:`predict_image`), with its trace
(:meth:`cait.CaiT.forward_trace`) for a caller that draws what the model did.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cait import runtime
from cait.data import (
    DIGITS,
    UNREADABLE_IMAGE_ERRORS,
    build_val_dataset,
    collate_samples,
    eval_transform,
)
from cait.data.classes import check_class_names
from cait.data.images import UnreadableImage, check_image_file, upright_rgb
from cait.files import first_line
from cait.inference.calibration import Calibration, prepare_loaded
from cait.inference.results import result_format, write_rows
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT, ModelTrace
from cait.threads import adapt as adapt_threads
from cait.training.engine import evaluate

# LoadedModel and load_for_inference live in cait.models.build; named here too because
# cait.inference exported them before the package layout
__all__ = [
    "EVAL_COLUMNS",
    "ImagePrediction",
    "LoadedModel",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "load_for_inference",
    "patch_size",
    "predict",
    "predict_image",
    "read_checked_image",
    "top_classes",
    "trace_input",
]

logger = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    model_name: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    amp: str = "none",
    crop_pct: float | None = None,
    classes_by_position: bool = False,
    precision: str = "fp32",
    calibration: Calibration | None = None,
) -> dict:
    """Top-1, top-5, loss and image count on the validation split (fp32 by default).

    The data's classes must be the checkpoint's (:func:`_val_dataset`);
    ``classes_by_position`` maps them by index instead, with a warning. ``precision``
    (:mod:`cait.precision`) is the other way to ask for bf16, and the way to int8, whose
    activation scales ``calibration`` fixes (:mod:`cait.inference.calibration`)."""
    if precision != "fp32" and amp != "none":
        raise ValueError(f"give either amp ({amp}) or precision ({precision}), not both")
    dev = runtime.inference_device(device, amp)
    loaded = load_for_inference(checkpoint, model_name)
    settings = loaded.settings.replace(crop_pct=crop_pct)
    # calibration reads its images as evaluation does (the same crop)
    prepared = prepare_loaded(
        dataclasses.replace(loaded, settings=settings), precision, dev, calibration
    )
    if amp != "none":  # --amp, the older name of a precision
        precision = amp
    amp = "bf16" if precision == "bf16" else amp
    dataset = _val_dataset(data, eval_transform(settings), loaded, checkpoint, classes_by_position)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=dev.type == "cuda",
    )
    result = evaluate(prepared.model, loader, dev, amp, progress=True)
    result["precision"] = precision
    if result["skipped"]:
        logger.warning(
            "skipped %d unreadable file(s):\n  %s",
            len(result["skipped"]),
            "\n  ".join(result["skipped"]),
        )
    return result


EVAL_COLUMNS = ("checkpoint", "precision", "top1", "top5", "loss", "images", "images_per_s")


def evaluate_checkpoints(
    checkpoints: Sequence[str],
    data: str,
    precisions: Sequence[str] = ("fp32",),
    results_file: str | Path | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """:func:`evaluate_checkpoint` for every checkpoint in every precision on one split:
    one row each (:data:`EVAL_COLUMNS`), in order. ``results_file`` (``.csv``, ``.jsonl``,
    ``.parquet``) is rewritten whole after each row, so a stopped run keeps what it did.
    A ``calibration`` option applies to the int8 rows."""
    if results_file is not None:
        result_format(results_file)  # a bad name fails before the first evaluation
    calibration = options.pop("calibration", None)
    if calibration is not None and "int8" not in precisions:
        raise ValueError(f"calibration is for precision int8, not {', '.join(precisions)}")
    rows: list[dict[str, Any]] = []
    for checkpoint in checkpoints:
        for precision in precisions:
            result = evaluate_checkpoint(
                checkpoint,
                data,
                precision=precision,
                calibration=calibration if precision == "int8" else None,
                **options,
            )
            row = {"checkpoint": str(checkpoint), "precision": result["precision"]}
            row.update({k: result[k] for k in EVAL_COLUMNS[2:]})
            row["skipped"] = len(result["skipped"])
            rows.append(row)
            logger.info(
                "%s %s: top-1 %.2f%%, %.0f images/s",
                checkpoint,
                precision,
                row["top1"],
                row["images_per_s"],
            )
            if results_file is not None:
                write_rows(results_file, rows)
    return rows


def _val_dataset(
    data: str, transform: Any, loaded: LoadedModel, checkpoint: str, by_position: bool
) -> Dataset:
    """The validation split, labelled with the indices of ``loaded``'s classes.

    Class folders go by name (``folder_names``: a checkpoint's class names, ImageNet's
    synsets for official 1000-class weights), so a subset of the classes is fine and a
    folder the checkpoint does not know is refused. The digits (``0``-``9``), and folders
    with ``by_position``, go by index: their names must then be the checkpoint's, or
    ``by_position`` maps them anyway (:func:`cait.data.classes.check_class_names`). A
    checkpoint that names no classes is mapped by index, as it always was.
    """
    names = loaded.folder_names
    by_name = names is not None and data != DIGITS and not by_position
    dataset = build_val_dataset(data, transform, names if by_name else None)
    if names is not None and not by_name:
        labels = ("the checkpoint", "the data")
        check_class_names(names, dataset.classes, labels, f"{checkpoint} on {data}", by_position)
    return dataset


def patch_size(model: nn.Module) -> int:
    """The side of one patch of ``model`` (a timm model's ``patch_embed``); 1 for a model
    without patches. An image smaller than a patch gives the model nothing to look at."""
    if isinstance(model, CaiT):
        return model.config.patch_size
    size = getattr(getattr(model, "patch_embed", None), "patch_size", 1)
    return max(size) if isinstance(size, tuple) else int(size)


def _size_problem(path: str | Path, width: int, height: int, patch: int) -> str | None:
    """Why an image of this size is refused (a decompression bomb, or smaller than a
    patch), or ``None``."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return (
            f"{path} is {width}x{height} pixels, more than the {limit:,} pixels cait decodes "
            "(it could be a decompression bomb)"
        )
    if min(width, height) < patch:
        return (
            f"{path} is {width}x{height} pixels, smaller than one {patch}x{patch} patch of "
            "this model"
        )
    return None


def read_checked_image(path: str | Path, patch: int = 1) -> Image.Image:
    """An image file a user named, as RGB (as :func:`cait.data.read_image` reads it), once its
    header shows it is no decompression bomb (at most ``PIL.Image.MAX_IMAGE_PIXELS`` pixels,
    where PIL itself only warns) and no smaller than one ``patch`` x ``patch`` patch. The
    file is opened once: the header is read, checked, then the pixels decoded. Anything
    else is a one-line ``ValueError`` (``FileNotFoundError``) naming the file."""
    if check_image_file(path).st_size == 0:  # nothing is opened before this check
        raise UnreadableImage(path, "empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS (and refuses above twice that); refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # the header only: nothing is decoded yet
                problem = _size_problem(path, *img.size, patch)
                if problem is None:
                    return upright_rgb(img)
    except PermissionError:
        raise ValueError(f"permission denied: {path}") from None
    except UNREADABLE_IMAGE_ERRORS as err:
        raise UnreadableImage(path, first_line(err)) from err
    raise ValueError(problem)


def top_classes(logits: Tensor, names: Sequence[str] | None, topk: int) -> list[dict[str, Any]]:
    """The ``topk`` most probable classes of one image's ``logits`` ``(num_classes,)``,
    best first: ``{"class": index, "name": ..., "probability": ...}``."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(topk, probs.numel()))
    return [
        {"class": i, "name": names[i] if names else str(i), "probability": p}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


@torch.no_grad()
def trace_input(model: CaiT, x: Tensor) -> ModelTrace:
    """:meth:`~cait.CaiT.forward_trace` of one input ``(C, H, W)``."""
    adapt_threads()  # the thread count for this image, after other processes' load
    return model.forward_trace(x[None])


@dataclass
class ImagePrediction:
    """What a model made of one image: ``x`` is the input it saw ``(C, S, S)``, normalised;
    ``predictions`` the top-k classes (:func:`top_classes`); ``trace`` the model's trace
    when it was asked for."""

    x: Tensor
    predictions: list[dict[str, Any]]
    trace: ModelTrace | None = None


@torch.no_grad()
def predict_image(
    loaded: LoadedModel,
    image: Image.Image,
    topk: int = 5,
    names: Sequence[str] | None = None,
    trace: bool = False,
) -> ImagePrediction:
    """Run ``loaded``'s model (on the device it is on) on one RGB image. ``names`` are the
    class names to report (default: the checkpoint's); ``trace`` keeps the model's trace
    (a cait model only)."""
    model = loaded.model
    device = next(model.parameters()).device
    x = eval_transform(loaded.settings)(image)
    if trace:
        if not isinstance(model, CaiT):
            raise ValueError(f"a trace needs a cait model with forward_trace, got {type(model)}")
        traced = trace_input(model, x.to(device))
        logits = traced.logits
    else:
        adapt_threads()
        traced, logits = None, model(x[None].to(device))
    names = names if names is not None else loaded.class_names
    return ImagePrediction(x, top_classes(logits[0], names, topk), traced)


def predict(
    checkpoint: str,
    images: list[str],
    topk: int = 5,
    model_name: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    calibration: Calibration | None = None,
) -> list[dict]:
    """Top-k classes with names and probabilities for each image file (each read and
    checked by :func:`read_checked_image`: a one-line error naming a file it cannot use),
    the model in ``precision`` (:mod:`cait.precision`; int8's scales fixed by
    ``calibration``)."""
    dev = runtime.inference_device(device, "none")
    loaded = load_for_inference(checkpoint, model_name)
    prepared = prepare_loaded(loaded, precision, dev, calibration)
    loaded = dataclasses.replace(loaded, model=prepared.model)
    results = []
    for image in images:
        picture = read_checked_image(image, patch_size(loaded.model))
        with prepared.autocast():
            answer = predict_image(loaded, picture, topk)
        results.append({"image": str(image), "predictions": answer.predictions})
    return results
