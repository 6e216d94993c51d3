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
into place: a failed export or check leaves nothing behind, and an existing output is only
replaced when asked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from cait.files import atomic_write, error_line, remove_stale_temporaries, temporary_path
from cait.models.build import load_for_inference
from cait.models.cait import CaiT
from cait.models.hub import HubUploadError, check_repo_id, push_folder_to_hub
from cait.models.registry import InputSpec
from cait.models.timm_interop import (
    OTHER_FORMATS_HINT,
    timm_from_folder,
    timm_hub_config,
    timm_state_dict,
    write_hub_folder,
)

__all__ = [
    "DEFAULT_EXAMPLE_BATCH",
    "FORMATS",
    "MIN_ONNX_OPSET",
    "PARITY_BATCHES",
    "TOLERANCES",
    "ExportError",
    "ExportResult",
    "Format",
    "ParityCheck",
    "export_checkpoint",
    "export_model",
]

logger = logging.getLogger(__name__)

Format = Literal["onnx", "pt2", "timm"]
FORMATS: tuple[str, ...] = get_args(Format)

# Largest |exported - eager| logit difference accepted. ONNX and torch.export run the same
# fp32 maths with other kernels (1e-4, the bound of issue 16); timm's model is the same
# architecture in PyTorch (1e-5, as our parity tests against timm).
TOLERANCES: dict[str, float] = {"onnx": 1e-4, "pt2": 1e-4, "timm": 1e-5}
# Batch sizes the checks run: 1, which torch.export specialises when it sees it, and 7,
# which is neither the traced batch nor a power of two.
PARITY_BATCHES = (1, 7)
# The batch of the traced example input: torch.export fixes a dimension it sees at 0 or 1.
DEFAULT_EXAMPLE_BATCH = 2
# LayerNormalization, in every block, entered the default ONNX domain in opset 17
# (onnx/docs/Changelog.md); torch.onnx's exporter writes opset 18 and converts down from it.
MIN_ONNX_OPSET = 17
# ONNX files are one protobuf message, limited to 2 GiB; larger weights would need a
# separate data file, which the atomic rename of one file cannot carry.
_ONNX_SINGLE_FILE_BYTES = 2**31
# Loggers of the ONNX exporter's optimisation passes, whose INFO lines narrate each rewrite.
_ONNX_CHATTY_LOGGERS = ("onnxscript", "onnx_ir")


class ExportError(ValueError):
    """The exporter cannot express the model, or the exported model disagrees with it."""


@dataclass(frozen=True)
class ParityCheck:
    """One comparison of the exported model with the eager one on random images."""

    batch: int
    size: tuple[int, int]
    max_abs_diff: float


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how closely the export matches the model.

    ``reference`` names what ran the exported model in the checks; ``checks`` hold the
    largest absolute logit difference per batch and image size, all within ``tolerance``.
    ``opset`` is the ONNX opset written, ``architecture`` the timm model name, and
    ``pushed_to`` the Hub commit URL after a push.
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
    _check_options(fmt, output, **options)  # before loading: a bad option costs nothing
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
) -> ExportResult:
    """Export ``model`` (put in eval mode) as ``fmt`` to ``output`` and check the export
    against it (see the module docstring); a failed check writes nothing.

    ``input_spec`` gives the image size of the example input and of the checks (and the
    preprocessing written into a timm folder); ``batch`` is the example's batch size, the
    export takes any. ``dynamic_size`` also leaves height and width free (multiples of the
    patch size) where the format and the model allow it, and raises :class:`ExportError`
    where they do not. ``opset`` is ONNX's; ``push_to_hub`` uploads a timm folder to that
    Hub repo. ``class_names`` and ``folder_names`` (the labels of the model's indices)
    become the timm folder's label names and descriptions.
    """
    _check_options(
        fmt, output, batch=batch, opset=opset, overwrite=overwrite, push_to_hub=push_to_hub
    )
    output = Path(output)
    model.eval()
    if fmt == "timm":
        result = _export_timm(
            model, output, input_spec, folder_names or class_names, class_names, dynamic_size
        )
        if push_to_hub is not None:
            try:
                url = push_folder_to_hub(output, push_to_hub)
            except HubUploadError as err:
                raise ExportError(str(err)) from err
            result = dataclasses.replace(result, pushed_to=url)
        return result
    example, shapes, sizes = _example_and_shapes(model, input_spec, batch, dynamic_size)
    if fmt == "onnx":
        return _export_onnx(model, output, example, shapes, sizes, opset, dynamic_size)
    return _export_pt2(model, output, example, shapes, sizes, dynamic_size)


def _check_options(
    fmt: str,
    output: str | os.PathLike[str],
    batch: int = DEFAULT_EXAMPLE_BATCH,
    opset: int | None = None,
    dynamic_size: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if batch < 2:
        raise ValueError(
            f"batch must be at least 2 (torch.export fixes a dimension it sees at 0 or 1, "
            f"and the export keeps the batch free), got {batch}"
        )
    if opset is not None and fmt != "onnx":
        raise ValueError(f"an opset is ONNX's: it means nothing for format {fmt!r}")
    if opset is not None and opset < MIN_ONNX_OPSET:
        raise ValueError(
            f"ONNX opset {opset} has no LayerNormalization, which every block uses: "
            f"the opset must be at least {MIN_ONNX_OPSET}"
        )
    if push_to_hub is not None:
        if fmt != "timm":
            raise ValueError(
                f"pushing to the Hub needs the timm format (a folder timm reads), got {fmt!r}"
            )
        check_repo_id(push_to_hub)
    path = Path(output)
    if fmt != "timm" and path.is_dir():
        raise ValueError(f"{path} is a folder; format {fmt!r} writes one file")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists: refusing to replace it without `overwrite`")
    if fmt == "pt2" and path.suffix != ".pt2":
        raise ValueError(
            f"a pt2 file must end with .pt2 (torch.export.load expects it), got {path}"
        )


# ---------------------------------------------------------------- the example and the checks


def _in_chans(model: nn.Module) -> int:
    if isinstance(model, CaiT):
        return model.config.in_chans
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    return 3


def _example_and_shapes(
    model: nn.Module, spec: InputSpec, batch: int, dynamic_size: bool
) -> tuple[Tensor, dict[int, Any], list[tuple[int, int]]]:
    """The traced example ``(B, C, H, W)``, its dynamic dimensions, and the image sizes the
    checks run at.

    With ``dynamic_size`` the example is one patch larger than the model's own size, so
    that the trace takes the path that resizes the position embeddings; the checks run at
    the model's size (where the eager model skips the resize) and two patches larger (a
    size never traced).
    """
    from torch.export import Dim

    side = spec.img_size
    shapes: dict[int, Any] = {0: Dim("batch", min=1)}
    sizes = [(side, side)]
    if dynamic_size:
        if not isinstance(model, CaiT):
            raise ExportError(
                f"dynamic height and width are exported for cait models only, "
                f"not {type(model).__name__}"
            )
        p = model.config.patch_size
        shapes[2] = p * Dim("rows", min=1)
        shapes[3] = p * Dim("cols", min=1)
        sizes.append((side + 2 * p, side + 2 * p))
        side += p
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, _in_chans(model), side, side, generator=generator)
    return example, shapes, sizes


@contextmanager
def _size_oblivious(enable: bool) -> Iterator[None]:
    """With symbolic image sizes, torch.export reasons about sizes "obliviously": it no
    longer assumes a symbolic size is not 1 where a tensor's layout would differ at 1
    (torch's 0/1 specialisation). Without it, a program traced at batch 2 with free height
    and width carries guards that reject batch 1 when it runs."""
    if not enable:
        yield
        return
    from torch.fx.experimental import _config as fx_config  # torch's switch for this

    with fx_config.patch(backed_size_oblivious=True):
        yield


def _parity(
    model: nn.Module,
    run: Callable[[Tensor], Tensor],
    what: str,
    sizes: Sequence[tuple[int, int]],
    in_chans: int,
    tolerance: float,
) -> tuple[ParityCheck, ...]:
    """Compare ``run`` (the exported model) with ``model`` at each size and each batch of
    :data:`PARITY_BATCHES` on seeded random images; raise :class:`ExportError` on a
    failure or a difference above ``tolerance``."""
    generator = torch.Generator().manual_seed(1)
    checks = []
    for height, width in sizes:
        for b in PARITY_BATCHES:
            x = torch.randn(b, in_chans, height, width, generator=generator)
            with torch.no_grad():
                want = model(x)
                try:
                    got = run(x)
                except Exception as err:  # whatever the runtime raises, the export fails
                    raise ExportError(
                        f"{what} rejects a batch of {b} {height}x{width} images ({error_line(err)})"
                    ) from err
            if got.shape != want.shape:
                raise ExportError(
                    f"{what} gives logits of shape {tuple(got.shape)} for a batch of {b} "
                    f"{height}x{width} images, the model {tuple(want.shape)}"
                )
            diff = (got.float() - want.float()).abs().max().item()
            checks.append(ParityCheck(b, (height, width), diff))
            logger.debug("%s, batch %d at %dx%d: max |diff| %.2e", what, b, height, width, diff)
            if not diff <= tolerance:  # NaN fails too
                raise ExportError(
                    f"{what} differs from the model by {diff:.2e} (tolerance {tolerance:.0e}) "
                    f"on a batch of {b} {height}x{width} images"
                )
    return tuple(checks)


# ------------------------------------------------------------------------------ onnx, pt2


def _export_onnx(
    model: nn.Module,
    output: Path,
    example: Tensor,
    shapes: dict[int, Any],
    sizes: list[tuple[int, int]],
    opset: int | None,
    dynamic_size: bool,
) -> ExportResult:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"the onnx format needs `pip install cait[export]` ({err})") from err
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes >= _ONNX_SINGLE_FILE_BYTES:
        raise ExportError(
            f"the weights take {weight_bytes / 2**30:.1f} GiB, over the 2 GiB of one ONNX file"
        )
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with _quiet_loggers(_ONNX_CHATTY_LOGGERS), _size_oblivious(dynamic_size):
            program = _onnx_program(model, example, shapes, opset)
        program.save(tmp)
        written["opset"] = _onnx_opset(onnx.load(str(tmp), load_external_data=False))
        if opset is not None and written["opset"] != opset:
            raise ExportError(
                f"asked for ONNX opset {opset}, the exporter could only write "
                f"opset {written['opset']}"
            )
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

        def run(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])

        written["checks"] = _parity(
            model, run, "onnxruntime", sizes, example.shape[1], TOLERANCES["onnx"]
        )

    atomic_write(output, write)
    return ExportResult(
        "onnx",
        output,
        "onnxruntime",
        TOLERANCES["onnx"],
        written["checks"],
        dynamic_size,
        opset=written["opset"],
    )


def _onnx_program(
    model: nn.Module, example: Tensor, shapes: dict[int, Any], opset: int | None
) -> Any:
    try:
        return torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=(shapes,),
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
    except Exception as err:  # the exporter's own errors are many; all end the export
        raise ExportError(f"torch.onnx could not export the model ({error_line(err)})") from err


@contextmanager
def _quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """Raise these loggers to WARNING for the block (their INFO lines narrate each pass)."""
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(max(saved[name], logging.WARNING))
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _onnx_opset(model_proto: Any) -> int:
    """The default-domain (``ai.onnx``) opset of a model."""
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _export_pt2(
    model: nn.Module,
    output: Path,
    example: Tensor,
    shapes: dict[int, Any],
    sizes: list[tuple[int, int]],
    dynamic_size: bool,
) -> ExportResult:
    what = "torch.export.load(...).module()"
    checks: list[tuple[ParityCheck, ...]] = []

    def write(tmp: Path) -> None:
        try:
            with torch.no_grad(), _size_oblivious(dynamic_size):
                program = torch.export.export(model, (example,), dynamic_shapes=(shapes,))
        except Exception as err:  # the exporter's own errors are many; all end the export
            raise ExportError(
                f"torch.export could not export the model ({error_line(err)})"
            ) from err
        with open(tmp, "wb") as f:  # a file object: the temporary name lacks the .pt2 suffix
            torch.export.save(program, f)
        with open(tmp, "rb") as f:
            loaded = torch.export.load(f).module()
        checks.append(_parity(model, loaded, what, sizes, example.shape[1], TOLERANCES["pt2"]))

    atomic_write(output, write)
    return ExportResult("pt2", output, what, TOLERANCES["pt2"], checks[0], dynamic_size)


# ----------------------------------------------------------------------------------- timm


def _export_timm(
    model: nn.Module,
    output: Path,
    input_spec: InputSpec,
    label_names: Sequence[str] | None,
    label_descriptions: Sequence[str] | None,
    dynamic_size: bool,
) -> ExportResult:
    if not isinstance(model, CaiT):
        raise ExportError(
            f"the timm format maps cait models to timm's; {type(model).__name__} is not one: "
            f"{OTHER_FORMATS_HINT}"
        )
    config = timm_hub_config(model, input_spec, label_names, label_descriptions, dynamic_size)
    weights = timm_state_dict(model)
    sizes = [(input_spec.img_size, input_spec.img_size)]
    if dynamic_size:
        step = model.config.patch_size
        sizes.append((input_spec.img_size + 2 * step, input_spec.img_size + 3 * step))
    what = 'timm.create_model("local-dir:...")'
    checks: list[tuple[ParityCheck, ...]] = []

    def write(folder: Path) -> None:
        write_hub_folder(folder, config, weights)
        try:
            theirs = timm_from_folder(folder)
        except Exception as err:  # timm's own checks (missing keys, arguments) end here
            raise ExportError(
                f"timm could not build the exported folder ({error_line(err)})"
            ) from err
        checks.append(
            _parity(model, theirs, what, sizes, model.config.in_chans, TOLERANCES["timm"])
        )

    _write_folder_atomically(output, write)
    return ExportResult(
        "timm",
        output,
        what,
        TOLERANCES["timm"],
        checks[0],
        dynamic_size,
        architecture=config["architecture"],
    )


def _write_folder_atomically(output: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside ``output`` through ``write``, then swap it in: a
    failure leaves ``output`` as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent, output.name)  # of an export killed mid-way
    tmp = temporary_path(output)  # per process: two exports never share one
    old = temporary_path(output.with_name(f"{output.name}.old"))
    tmp.mkdir()
    try:
        write(tmp)
        if output.is_dir():
            output.rename(old)
        elif output.exists():
            output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not output.exists():
            old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)
