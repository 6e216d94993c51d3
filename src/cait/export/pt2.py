"""The ``pt2`` format: a ``torch.export`` program saved with ``torch.export.save``, any batch
size; the check runs ``torch.export.load(path).module()``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cait.export.job import ExportError, ExportJob
from cait.export.tracing import example_and_shapes, size_oblivious
from cait.files import error_line

__all__ = ["load_pt2", "write_pt2"]


def write_pt2(job: ExportJob, path: Path) -> dict[str, Any]:
    """Trace ``job.model`` with ``torch.export`` and save the program to ``path``."""
    example, shapes = example_and_shapes(job)
    try:
        with torch.no_grad(), size_oblivious(job.dynamic_size):
            program = torch.export.export(job.model, (example,), dynamic_shapes=(shapes,))
    except Exception as err:  # the exporter's own errors are many; all end the export
        raise ExportError(f"torch.export could not export the model ({error_line(err)})") from err
    with open(path, "wb") as f:  # a file object: a temporary name lacks the .pt2 suffix
        torch.export.save(program, f)
    return {}


def load_pt2(path: Path) -> nn.Module:
    """The saved program, as a module the checks call."""
    with open(path, "rb") as f:
        return torch.export.load(f).module()
