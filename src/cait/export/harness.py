"""The one path every format's export takes: check the request, hold the output, write beside
it, check the export against the eager model, put it in place, and push it when asked."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from cait.export.formats import ExportFormat, Folder, check_output, check_request
from cait.export.job import DEFAULT_EXAMPLE_BATCH, ExportError, ExportJob
from cait.export.onnx import quantize_onnx
from cait.export.parity import (
    ParityCheck,
    QuantizedParity,
    check_sizes,
    parity,
    quantized_parity,
)
from cait.files import (
    OutputLock,
    atomic_write,
    write_folder_atomically,
)
from cait.models.build import load_for_inference
from cait.models.hub import HubUploadError, push_folder_to_hub
from cait.models.registry import InputSpec

__all__ = ["ExportResult", "export_checkpoint", "export_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how closely the export matches the model.

    ``reference`` names what ran the exported model in the checks; ``checks`` hold the
    largest absolute logit difference per batch and image size, all within ``tolerance``.
    ``opset`` is the ONNX opset written, ``architecture`` the timm model name, and
    ``pushed_to`` the Hub commit URL after a push. A quantized export (``quantize``) is
    held to ``quantized`` (top-1 agreement with the fp32 model) instead of ``tolerance``.
    """

    format: str
    output: Path
    reference: str
    tolerance: float
    checks: tuple[ParityCheck, ...]
    dynamic_size: bool
    opset: int | None = None
    architecture: str | None = None
    pushed_to: str | None = None
    quantize: str | None = None
    quantized: QuantizedParity | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)


def export_checkpoint(
    checkpoint: str,
    fmt: str,
    output: str | os.PathLike[str],
    model_name: str | None = None,
    **options: Any,
) -> ExportResult:
    """Export any checkpoint :func:`~cait.models.build.load_for_inference` reads.

    ``options`` are those of :func:`export_model`; the checkpoint's input spec and class
    names go with the model.
    """
    check_request(fmt, output, **options)  # before loading: a bad option costs nothing
    if model_name is None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        loaded = load_for_inference(checkpoint, model_name)
    except SafetensorError as err:
        raise ValueError(f"{checkpoint} is not a readable safetensors file ({err})") from err
    return export_model(
        loaded.model,
        fmt,
        output,
        loaded.settings,
        class_names=loaded.class_names,
        folder_names=loaded.folder_names,
        **options,
    )


def export_model(
    model: nn.Module,
    fmt: str,
    output: str | os.PathLike[str],
    input_spec: InputSpec,
    *,
    class_names: Sequence[str] | None = None,
    folder_names: Sequence[str] | None = None,
    batch: int = DEFAULT_EXAMPLE_BATCH,
    opset: int | None = None,
    dynamic_size: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    quantize: str | None = None,
) -> ExportResult:
    """Export ``model`` (put in eval mode) as ``fmt`` to ``output`` and check the export
    against it (see :mod:`cait.export`); a failed check or Ctrl-C writes nothing.

    ``input_spec`` gives the image size of the example input and of the checks (and the
    preprocessing written into a timm folder); ``batch`` is the example's batch size, the
    export takes any. ``dynamic_size`` also leaves height and width free (multiples of the
    patch size) where the format and the model allow it, and raises :class:`ExportError`
    where they do not. ``quantize="int8"`` writes an ONNX file quantized by ONNX Runtime
    (:func:`~cait.export.onnx.quantize_onnx`), refused when its top-1 agreement with the
    model falls below :data:`~cait.export.parity.QUANTIZED_MIN_AGREEMENT`. ``opset`` is
    ONNX's; ``push_to_hub`` uploads a timm folder to that
    Hub repo. ``class_names`` and ``folder_names`` (the labels of the model's indices)
    become the timm folder's label names and descriptions. ``overwrite`` replaces an
    earlier export (never a folder holding anything else); one process at a time writes
    an output, others are refused.
    """
    entry = check_request(
        fmt,
        output,
        batch=batch,
        opset=opset,
        dynamic_size=dynamic_size,
        overwrite=overwrite,
        push_to_hub=push_to_hub,
        quantize=quantize,
    )
    output = Path(output)
    model.eval()
    job = ExportJob(
        model,
        input_spec,
        batch,
        opset,
        dynamic_size,
        folder_names or class_names,
        class_names,
        quantize,
    )
    with OutputLock(output, what="cait export"):
        check_output(entry, output, overwrite)  # again: it may have changed meanwhile
        result = _write_and_check(entry, job, output)
        if push_to_hub is not None:
            try:
                url = push_folder_to_hub(output, push_to_hub)
            except HubUploadError as err:
                raise ExportError(str(err)) from err
            result = dataclasses.replace(result, pushed_to=url)
    return result


def _write_and_check(entry: ExportFormat, job: ExportJob, output: Path) -> ExportResult:
    """Write the export beside ``output`` with the format's writer, run the parity checks
    on what the format's loader makes of it, and only then put it in place. Ctrl-C stops
    the write or the checks, and nothing is left."""
    details: dict[str, Any] = {}
    checks: list[ParityCheck] = []

    def write(path: Path) -> None:
        if job.quantize is None:
            details.update(entry.write(job, path))
        else:  # the fp32 export, then ONNX Runtime's quantization of it into place
            with tempfile.TemporaryDirectory(prefix="cait-quantize-") as folder:
                fp32 = Path(folder) / "model.onnx"
                details.update(entry.write(job, fp32))
                quantize_onnx(fp32, path)
            details["quantize"] = job.quantize
        run = entry.load(path)
        sizes = check_sizes(job, entry.other_size)
        # a quantized export differs by its rounding: held to its top-1 agreement instead
        tolerance = entry.tolerance if job.quantize is None else math.inf
        checks.extend(parity(job.model, run, entry.reference, sizes, job.in_chans, tolerance))
        if job.quantize is not None:
            details["quantized"] = quantized_parity(
                job.model, run, entry.reference, sizes[0], job.in_chans
            )

    if isinstance(entry.writes, Folder):
        write_folder_atomically(output, write, interruptible=True)
    else:
        atomic_write(output, write, interruptible=True)
    return ExportResult(
        entry.name,
        output,
        entry.reference,
        entry.tolerance if job.quantize is None else math.inf,
        tuple(checks),
        job.dynamic_size,
        **details,
    )
