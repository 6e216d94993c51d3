"""The ``onnx`` format: ``torch.onnx.export(..., dynamo=True)``, input ``images``, output
``logits``, any batch size; the check runs it in onnxruntime. ``onnx`` and ``onnxruntime``
(``pip install cait[export]``) are imported only when an export runs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cait.export.job import ExportError, ExportJob
from cait.export.tracing import example_and_shapes, size_oblivious
from cait.files import error_line

__all__ = ["MIN_ONNX_OPSET", "check_opset", "load_onnx", "quantize_onnx", "write_onnx"]

# LayerNormalization, in every block, entered the default ONNX domain in opset 17
# (onnx/docs/Changelog.md); torch.onnx's exporter writes opset 18 and converts down from it.
MIN_ONNX_OPSET = 17
# ONNX files are one protobuf message, limited to 2 GiB; larger weights would need a
# separate data file, which the atomic rename of one file cannot carry.
_ONNX_SINGLE_FILE_BYTES = 2**31
# Loggers of the ONNX exporter, raised to these levels while it runs: its optimisation
# passes narrate each rewrite at INFO, and its version converter logs a traceback at
# WARNING when it cannot reach the opset asked for, which our own error then says in a line.
_ONNX_CHATTY_LOGGERS: Mapping[str, int] = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "onnxscript.version_converter": logging.ERROR,
}
_INPUT, _OUTPUT = "images", "logits"


def check_opset(opset: int) -> None:
    """Refuse an opset the model cannot be written in, or that onnx does not know (when
    onnx is installed; the export says so when it is not)."""
    if opset < MIN_ONNX_OPSET:
        raise ValueError(
            f"ONNX opset {opset} has no LayerNormalization, which every block uses: "
            f"the opset must be at least {MIN_ONNX_OPSET}"
        )
    try:
        import onnx
    except ImportError:
        return
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(
            f"ONNX opset {opset} does not exist yet: onnx {onnx.__version__} knows opsets up "
            f"to {newest}"
        )


def write_onnx(job: ExportJob, path: Path) -> dict[str, Any]:
    """Export ``job.model`` to the ONNX file ``path``; returns the opset written."""
    try:
        import onnx
    except ImportError as err:
        raise ExportError(f"the onnx format needs `pip install cait[export]` ({err})") from err
    weights = job.model.state_dict().values()
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    if weight_bytes >= _ONNX_SINGLE_FILE_BYTES:
        raise ExportError(
            f"the weights take {weight_bytes / 2**30:.1f} GiB, over the 2 GiB of one ONNX file"
        )
    example, shapes = example_and_shapes(job)
    with _quiet_loggers(_ONNX_CHATTY_LOGGERS), size_oblivious(job.dynamic_size):
        try:
            program = torch.onnx.export(
                job.model,
                (example,),
                dynamo=True,
                dynamic_shapes=(shapes,),
                input_names=[_INPUT],
                output_names=[_OUTPUT],
                opset_version=job.opset,
                verbose=False,
            )
        except Exception as err:  # the exporter's own errors are many; all end the export
            raise ExportError(f"torch.onnx could not export the model ({error_line(err)})") from err
    program.save(path)
    written = _onnx_opset(onnx.load(str(path), load_external_data=False))
    if job.opset is not None and written != job.opset:
        raise ExportError(
            f"asked for ONNX opset {job.opset}, the exporter could only write opset {written}"
        )
    return {"opset": written}


def load_onnx(path: Path) -> Callable[[Tensor], Tensor]:
    """The ONNX file run in onnxruntime on the CPU, as a function of a batch of images."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"the onnx format needs `pip install cait[export]` ({err})") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run([_OUTPUT], {_INPUT: x.numpy()})[0])

    return run


def quantize_onnx(source: Path, path: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of ``source`` into ``path``: the weights of
    every ``MatMul`` with a constant operand (qkv, projections, MLP, head) in int8, one
    scale per output channel, activations quantized as they come (``MatMulInteger``). The
    attention's products of two activations, the softmax, LayerNorm, GELU and the patch
    embedding stay in fp32, as in :func:`cait.precision.quantize_int8`."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise ExportError(f"--quantize needs `pip install cait[export]` ({err})") from err
    # it suggests shape pre-processing at WARNING on the root logger; dynamic
    # quantization of MatMul does not need it
    with _quiet_loggers({"root": logging.ERROR}):
        quantize_dynamic(
            source,
            path,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )


@contextmanager
def _quiet_loggers(levels: Mapping[str, int]) -> Iterator[None]:
    """Raise these loggers to at least these levels for the block."""
    loggers = {name: logging.getLogger(None if name == "root" else name) for name in levels}
    saved = {name: logger.level for name, logger in loggers.items()}
    for name, level in levels.items():
        loggers[name].setLevel(max(saved[name], level))
    try:
        yield
    finally:
        for name, level in saved.items():
            loggers[name].setLevel(level)


def _onnx_opset(model_proto: Any) -> int:
    """The default-domain (``ai.onnx``) opset of a model."""
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
