"""Inference from a checkpoint: one image (:mod:`cait.inference.image`: ``cait predict
IMAGE`` and the app), a whole validation split (``cait eval``), and many images in batches
into a resumable results file (:mod:`cait.inference.batch`, :mod:`cait.inference.results`);
each in fp32, bf16 or int8 (:mod:`cait.precision`)."""

from cait.inference.batch import ImageFiles, list_images, predict_to_file
from cait.inference.image import (
    ImagePrediction,
    LoadedModel,
    evaluate_checkpoint,
    evaluate_checkpoints,
    load_for_inference,
    patch_size,
    predict,
    predict_image,
    read_checked_image,
    top_classes,
    trace_input,
)
from cait.inference.results import RESULT_FORMATS, ResultsJournal, read_rows, write_rows

__all__ = [
    "RESULT_FORMATS",
    "ImageFiles",
    "ImagePrediction",
    "LoadedModel",
    "ResultsJournal",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "list_images",
    "load_for_inference",
    "patch_size",
    "predict",
    "predict_image",
    "predict_to_file",
    "read_checked_image",
    "read_rows",
    "top_classes",
    "trace_input",
    "write_rows",
]
