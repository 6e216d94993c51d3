"""The table of export formats: one entry per format says what it writes (a file, maybe with a
required suffix, or a folder of known files), the tolerance of its check, which options it
takes, the one function that writes it and what runs it for the check. Adding a format is
one :func:`register_format` call and its writer; the harness (:mod:`cait.export.harness`)
and the CLI's choices follow from the table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from cait.export.job import DEFAULT_EXAMPLE_BATCH, ExportJob
from cait.export.onnx import check_opset, load_onnx, write_onnx
from cait.export.pt2 import load_pt2, write_pt2
from cait.export.timm import TIMM_FOLDER_FILES, load_timm, write_timm
from cait.models.hub import check_repo_id

__all__ = [
    "FORMATS",
    "OPTIONS",
    "QUANTIZE",
    "TOLERANCES",
    "ExportFormat",
    "File",
    "Folder",
    "check_output",
    "check_request",
    "get_format",
    "register_format",
]

# A format's writer: the export of the job written at a path (a file, or a folder that
# exists and is empty), returning what it adds to the ExportResult (an opset, an architecture).
Writer = Callable[[ExportJob, Path], Mapping[str, Any]]
# What runs a written export for the checks: a function of a batch of images (B, C, H, W)
# giving logits (B, num_classes).
Loader = Callable[[Path], Callable[[Tensor], Tensor]]

# The options of export_model that only some formats take, and the line that refuses one
# for a format that does not (a format's entry names those it takes).
OPTIONS: Mapping[str, str] = {
    "opset": "an opset is ONNX's: it means nothing for format {fmt!r}",
    "dynamic_size": "format {fmt!r} takes one image size: dynamic height and width mean "
    "nothing for it",
    "push_to_hub": "pushing to the Hub needs the timm format (a folder timm reads), got {fmt!r}",
    "quantize": "int8 quantization is ONNX Runtime's: it needs format 'onnx', got {fmt!r}",
}
# What an export can be quantized to (``quantize``): int8 weights, dynamic activations.
QUANTIZE = ("int8",)


@dataclass(frozen=True)
class File:
    """A format that writes one file; ``suffix``, when given, is required, for the reason
    ``why``."""

    suffix: str = ""
    why: str = ""


@dataclass(frozen=True)
class Folder:
    """A format that writes a folder holding ``files``: an existing folder is an earlier
    export, which ``overwrite`` replaces, only when it holds nothing else."""

    files: frozenset[str]


@dataclass(frozen=True)
class ExportFormat:
    """One row of the table. ``reference`` names what ``load`` runs, in messages; the
    largest |exported - eager| logit difference the check accepts is ``tolerance``."""

    name: str
    writes: File | Folder
    tolerance: float
    options: frozenset[str]
    write: Writer
    load: Loader
    reference: str
    # the second image size checked under dynamic_size, in patches beyond the model's own
    # (height, width): one never traced
    other_size: tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        unknown = self.options - OPTIONS.keys()
        if unknown:
            raise ValueError(f"format {self.name!r}: no options {sorted(unknown)}")


_FORMATS: dict[str, ExportFormat] = {}


def register_format(entry: ExportFormat) -> ExportFormat:
    """Add a row to the table; a name that is already taken raises ``ValueError``."""
    if entry.name in _FORMATS:
        raise ValueError(f"an export format named {entry.name!r} is already registered")
    _FORMATS[entry.name] = entry
    return entry


def get_format(name: str) -> ExportFormat:
    """The row of format ``name``; ``ValueError`` naming the formats for any other."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"format must be one of {list(_FORMATS)}, got {name!r}") from None


# Tolerances: ONNX and torch.export run the same fp32 maths with other kernels (1e-4, the
# bound of issue 16); timm's model is the same architecture in PyTorch (1e-5, as our parity
# tests against timm). ONNX and torch.export trace a square example one patch larger than
# the model's size under dynamic_size; timm's models take any rectangle.
register_format(
    ExportFormat(
        "onnx",
        File(),
        tolerance=1e-4,
        options=frozenset({"opset", "dynamic_size", "quantize"}),
        write=write_onnx,
        load=load_onnx,
        reference="onnxruntime",
    )
)
register_format(
    ExportFormat(
        "pt2",
        File(".pt2", "torch.export.load expects it"),
        tolerance=1e-4,
        options=frozenset({"dynamic_size"}),
        write=write_pt2,
        load=load_pt2,
        reference="torch.export.load(...).module()",
    )
)
register_format(
    ExportFormat(
        "timm",
        Folder(TIMM_FOLDER_FILES),
        tolerance=1e-5,
        options=frozenset({"dynamic_size", "push_to_hub"}),
        write=write_timm,
        load=load_timm,
        reference='timm.create_model("local-dir:...")',
        other_size=(2, 3),
    )
)
# The built-in formats (the CLI's choices).
FORMATS: tuple[str, ...] = tuple(_FORMATS)


class _Tolerances(MutableMapping[str, float]):
    """The table's tolerance column by format name; setting one replaces that row's
    tolerance (a test loosens or tightens a check so)."""

    def __getitem__(self, name: str) -> float:
        return _FORMATS[name].tolerance

    def __setitem__(self, name: str, tolerance: float) -> None:
        _FORMATS[name] = dataclasses.replace(_FORMATS[name], tolerance=tolerance)

    def __delitem__(self, name: str) -> None:
        raise TypeError("a format's tolerance cannot be removed, only changed")

    def __iter__(self) -> Iterator[str]:
        return iter(_FORMATS)

    def __len__(self) -> int:
        return len(_FORMATS)

    def __repr__(self) -> str:
        return repr(dict(self))


# Largest |exported - eager| logit difference accepted, by format.
TOLERANCES: MutableMapping[str, float] = _Tolerances()


def check_request(
    fmt: str,
    output: str | os.PathLike[str],
    *,
    batch: int = DEFAULT_EXAMPLE_BATCH,
    opset: int | None = None,
    dynamic_size: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    quantize: str | None = None,
) -> ExportFormat:
    """The row of ``fmt``, once the options and the output suit it (see
    :func:`cait.export.export_model`); ``ValueError`` in one line otherwise."""
    entry = get_format(fmt)
    if batch < 2:
        raise ValueError(
            f"batch must be at least 2 (torch.export fixes a dimension it sees at 0 or 1, "
            f"and the export keeps the batch free), got {batch}"
        )
    given = {"opset": opset is not None, "dynamic_size": dynamic_size}
    given["push_to_hub"] = push_to_hub is not None
    given["quantize"] = quantize is not None
    for option in OPTIONS:
        if given[option] and option not in entry.options:
            raise ValueError(OPTIONS[option].format(fmt=fmt))
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    if opset is not None:
        check_opset(opset)
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    check_output(entry, Path(output), overwrite)
    return entry


def check_output(entry: ExportFormat, path: Path, overwrite: bool) -> None:
    """Refuse an output the format cannot write, or may not replace: an existing one
    without ``overwrite``, and a folder that is not an earlier export even with it."""
    if path.name in ("", ".", ".."):
        raise ValueError(
            f"the output {str(path)!r} names a folder to write in, not what to write: give "
            f"the {entry.name} export a name, e.g. {path / _example_name(entry)}"
        )
    writes = entry.writes
    if isinstance(writes, File) and path.is_dir():
        raise ValueError(f"{path} is a folder; format {entry.name!r} writes one file")
    if isinstance(writes, Folder) and os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"{path} is not a folder; format {entry.name!r} writes a folder")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path} exists: refusing to replace it without `overwrite`")
    if isinstance(writes, File) and writes.suffix and path.suffix != writes.suffix:
        why = f" ({writes.why})" if writes.why else ""
        raise ValueError(f"a {entry.name} file must end with {writes.suffix}{why}, got {path}")
    if isinstance(writes, Folder) and path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in writes.files or p.is_dir())
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(
                f"{path} holds what a {entry.name} export does not write ({shown}): "
                f"refusing to replace it, even with `overwrite`; choose another output"
            )


def _example_name(entry: ExportFormat) -> str:
    if isinstance(entry.writes, Folder):
        return f"{entry.name}_model"
    return f"model{entry.writes.suffix or '.' + entry.name}"
