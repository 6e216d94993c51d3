"""Exporting a model for other runtimes: ``cait export``.

Three formats, each checked against the eager model before it is kept:

- ``onnx``: ``torch.onnx.export(..., dynamo=True)``, input ``images``, output ``logits``, any
  batch size; the check runs it in onnxruntime.
- ``pt2``: a ``torch.export`` program saved with ``torch.export.save``, any batch size; the
  check runs ``torch.export.load(path).module()``.
- ``timm``: a folder in the Hugging Face Hub layout timm reads (``config.json`` and
  ``model.safetensors`` under timm's parameter names); the check builds timm's own model with
  ``timm.create_model("local-dir:FOLDER", pretrained=True)``. It can be pushed to the Hub.

Every output is written beside its destination under a temporary name, checked, then renamed
into place: a failed export or check, or Ctrl-C, leaves nothing behind; an existing output is
only replaced when asked, and only when it is an earlier export; one process at a time
writes an output.

The package: :mod:`~cait.export.formats` is the table of formats (adding one is an entry
there and its writer, a module of its own: :mod:`~cait.export.onnx`,
:mod:`~cait.export.pt2`, :mod:`~cait.export.timm`); :mod:`~cait.export.harness` is the path
every export takes, :mod:`~cait.export.parity` the checks they share. Importing it imports
none of onnx, onnxruntime or timm.
"""

from cait.export.formats import FORMATS, TOLERANCES
from cait.export.harness import ExportResult, export_checkpoint, export_model
from cait.export.job import DEFAULT_EXAMPLE_BATCH, ExportError
from cait.export.onnx import MIN_ONNX_OPSET
from cait.export.parity import PARITY_BATCHES, ParityCheck

__all__ = [
    "DEFAULT_EXAMPLE_BATCH",
    "FORMATS",
    "MIN_ONNX_OPSET",
    "PARITY_BATCHES",
    "TOLERANCES",
    "ExportError",
    "ExportResult",
    "ParityCheck",
    "export_checkpoint",
    "export_model",
]
