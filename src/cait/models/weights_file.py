"""What a weights file holds, how it is written and how it is read: one home for cait's format.

A checkpoint describes its model with four metadata entries (:data:`METADATA_KEYS`):

- ``model``: one of our variants (``cait models``) or ``timm:NAME`` in timm's registry;
- ``model_config``: for our variants every ``CaiTConfig`` field (unknown fields raise); for a
  timm model the plain constructor fields of ``TIMM_MODEL_ARGS``, ``num_classes`` included;
- ``data_settings``: the five fields of ``InputSpec``, each in a sane range;
- ``class_names``: one string per class of the model.

Two kinds of file hold them beside the weights:

- ``.safetensors`` (``model.safetensors``): each entry JSON-encoded in the header, beside two
  entries about the file itself (:data:`HEADER_FILE_KEYS`); any other header entry is refused.
- ``.pt`` (``last.pt``, ``best.pt``): a ``torch.save``'d dict ``{"model": the weights,
  "metadata": the four entries, "run": the state of the run that wrote it}``. ``"model"``
  holds the weights as in the official DeiT/CaiT ``.pth`` files; ``"run"`` is training's
  (:mod:`cait.training.checkpoint` says what it holds), and this module does not look inside.
  A ``.pt`` written before this layout (``tests/fixtures/pre_seams``, ``pre_layout``) held the
  run's fields and three metadata entries side by side at the top level, and the model's
  name in the run's ``config`` only: it is read as it was (:func:`decode_pt`).

Files without metadata (official or timm weights, a plain state dict) hold weights only.
Metadata is untrusted input (STYLE principle 13): it is checked against this closed schema
before anything is built, and sizes are bounded here only as far as building the model's
skeleton (on the meta device) needs; whether they fit the file's tensors is checked by the
loader (:func:`cait.models.build.load_for_inference`) before any real allocation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cait.files import atomic_write, load_file_safely
from cait.models.cait import CaiT
from cait.models.checks import (
    CROP_PCT_RANGE,
    INTERPOLATIONS,
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_DEPTH,
    MAX_IMG_SIZE,
    MAX_WIDTH,
    choice,
    integer,
    number,
    sequence,
)
from cait.models.config import CaiTConfig, InputSpec
from cait.models.pretrained import safetensors_shapes, tensor_shapes, unwrap_state_dict
from cait.models.registry import get_variant
from cait.models.timm_interop import check_timm_args, check_timm_name, is_timm

__all__ = [
    "HEADER_FILE_KEYS",
    "METADATA_KEYS",
    "ModelMetadata",
    "WeightsFile",
    "check_metadata",
    "checkpoint_metadata",
    "class_names_of",
    "decode_header",
    "decode_pt",
    "describe_spec",
    "encode_header",
    "model_spec",
    "read_checkpoint_metadata",
    "read_weights_file",
    "save_pt",
    "save_safetensors",
    "spec_of",
]

# The metadata entries, in the order they are written; the first two (the spec) name the
# model, the other two say what it takes and what it answers.
METADATA_KEYS = ("model", "model_config", "data_settings", "class_names")
_SPEC_KEYS = METADATA_KEYS[:2]
# Safetensors header entries about the file, not the model: "format" (safetensors' own, "pt")
# and "source" (the file `cait convert` read). Read as strings, otherwise ignored.
HEADER_FILE_KEYS = ("format", "source")
# The entries of a .pt file cait writes: the weights (under the official files' key, which
# cait.models.pretrained.unwrap_state_dict reads), the metadata, the run's state.
_WEIGHTS, _METADATA, _RUN = "model", "metadata", "run"
_PT_KEYS = (_WEIGHTS, _METADATA, _RUN)


# ------------------------------------------------------------------ composing the metadata


def model_spec(name: str, model: nn.Module, model_args: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``model``: its name and its full config."""
    if isinstance(model, CaiT):
        if model.global_pool != model.config.pooling:
            raise ValueError(
                f"global_pool={model.global_pool!r} differs from the config's pooling "
                f"{model.config.pooling!r}, and checkpoints record the config only: set "
                "the config's pooling instead"
            )
        return {"model": name, "model_config": model.config.to_dict()}
    return {"model": name, "model_config": {"num_classes": model.num_classes, **model_args}}


def checkpoint_metadata(
    spec: dict[str, Any], inputs: InputSpec, class_names: list[str]
) -> dict[str, Any]:
    """The entries that describe a model in every checkpoint cait writes (``spec`` is
    :func:`model_spec`'s)."""
    return {
        "model": spec["model"],
        "model_config": spec["model_config"],
        "data_settings": inputs.to_dict(),
        "class_names": list(class_names),
    }


def spec_of(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``metadata`` that :func:`model_spec` gives: the name and the config."""
    return {k: metadata.get(k) for k in _SPEC_KEYS}


def class_names_of(metadata: Mapping[str, Any]) -> list[str]:
    """The class names of ``metadata`` (checked entries, as :func:`checkpoint_metadata`
    composes them): index ``i`` of the model's output is the ``i``-th."""
    return list(metadata["class_names"])


def describe_spec(spec: Mapping[str, Any]) -> str:
    """A spec on one line, for messages: the name, then the config."""
    return f"{spec['model']} {spec['model_config']}"


# ------------------------------------------------------------------ the schema


def _check_model_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"model must be a model name, got {name!r}")
    if is_timm(name):
        try:
            check_timm_name(name)
        except ValueError:
            raise ValueError(f"model {name!r} is not in timm's registry") from None
        return name
    get_variant(name)  # an unknown name raises, with the close matches
    return name


def _check_cait_config(data: Any) -> CaiTConfig:
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"model_config must be a mapping of field names, got {data!r}")
    try:
        config = CaiTConfig.from_dict(dict(data))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model_config: {err}") from None
    bounds = {
        "depth": MAX_DEPTH,
        "ca_depth": MAX_DEPTH,
        "embed_dim": MAX_WIDTH,
        "num_classes": MAX_CLASSES,
        "in_chans": MAX_CHANNELS,
        "img_size": MAX_IMG_SIZE,
    }
    for field, high in bounds.items():
        if getattr(config, field) > high:
            raise ValueError(
                f"model_config.{field} must be at most {high}, got {getattr(config, field)}"
            )
    return config


def _check_input_spec(data: Any) -> InputSpec:
    fields = InputSpec.__dataclass_fields__
    if not isinstance(data, Mapping):
        raise ValueError(f"data_settings must be a mapping, got {data!r}")
    unknown = sorted(str(k) for k in data if k not in fields)
    missing = sorted(k for k in fields if k not in data)
    if unknown or missing:
        raise ValueError(
            f"data_settings must have exactly the fields {list(fields)}; unknown {unknown}, "
            f"missing {missing}"
        )
    # per-channel numbers: 1 to MAX_CHANNELS of them, each in its range
    mean = sequence(number(-1e3, 1e3), (1, MAX_CHANNELS))
    std = sequence(number(1e-6, 1e3), (1, MAX_CHANNELS))
    checked = {
        "img_size": integer(1, MAX_IMG_SIZE)(data["img_size"], "data_settings.img_size"),
        "crop_pct": number(*CROP_PCT_RANGE)(data["crop_pct"], "data_settings.crop_pct"),
        "interpolation": choice(*INTERPOLATIONS)(
            data["interpolation"], "data_settings.interpolation"
        ),
        "mean": mean(data["mean"], "data_settings.mean"),
        "std": std(data["std"], "data_settings.std"),
    }
    if len(checked["mean"]) != len(checked["std"]):
        raise ValueError(
            f"data_settings.mean and data_settings.std must have one value per channel, got "
            f"{len(checked['mean'])} and {len(checked['std'])}"
        )
    return InputSpec(**checked)


def _check_class_names(names: Any, num_classes: int) -> None:
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be a list of strings, got {names!r:.200}")
    if len(names) != num_classes:
        raise ValueError(
            f"class_names must name the model's {num_classes} classes, got {len(names)} names"
        )


@dataclass(frozen=True)
class ModelMetadata:
    """A checkpoint's metadata, checked: ``entries`` as the file holds them (what a copy
    writes back), and what they say, typed."""

    entries: dict[str, Any]
    name: str  # a variant or timm:NAME
    config: CaiTConfig | dict[str, Any]  # for timm:NAME, its checked constructor fields
    inputs: InputSpec
    class_names: list[str]


def check_metadata(meta: Any, source: str) -> ModelMetadata:
    """``meta`` checked against the schema (module docstring); any problem raises a one-line
    ``ValueError`` naming ``source`` (the file) and the field."""
    try:
        if not isinstance(meta, Mapping):
            raise ValueError(f"the metadata must be a mapping, got {type(meta).__name__}")
        unknown = sorted(str(k) for k in meta if k not in METADATA_KEYS)
        missing = [k for k in METADATA_KEYS if k not in meta]
        if unknown or missing:
            raise ValueError(
                f"the entries must be {list(METADATA_KEYS)}; unknown {unknown}, missing {missing}"
            )
        name = _check_model_name(meta["model"])
        config: CaiTConfig | dict[str, Any]
        if is_timm(name):
            config = check_timm_args(meta["model_config"], "model_config")
            if "num_classes" not in config:
                raise ValueError("model_config of a timm model must give num_classes")
            num_classes = config["num_classes"]
        else:
            config = _check_cait_config(meta["model_config"])
            num_classes = config.num_classes
        inputs = _check_input_spec(meta["data_settings"])
        _check_class_names(meta["class_names"], num_classes)
    except ValueError as err:
        raise ValueError(f"{source}: bad checkpoint metadata: {err}") from None
    entries = {k: meta[k] for k in METADATA_KEYS}
    return ModelMetadata(entries, name, config, inputs, list(meta["class_names"]))


# ------------------------------------------------------------------ .safetensors


def encode_header(
    metadata: Mapping[str, Any] | None, source: str | None = None, variant: str | None = None
) -> dict[str, str]:
    """A safetensors header: the metadata, each entry JSON-encoded. A converted file also
    names its ``source`` file (with ``format``) and, when it has no metadata, the ``variant``
    its weights were checked against (``model``, a plain name)."""
    header = {} if source is None else {"format": "pt", "source": source}
    if metadata is None:
        return header if variant is None else {**header, "model": variant}
    return {**header, **{k: json.dumps(v) for k, v in metadata.items()}}


def decode_header(header: Mapping[str, str], source: str) -> ModelMetadata | None:
    """The metadata in a safetensors header, JSON-decoded and checked, or ``None`` for a
    header without a model config (timm's, an official file's, ``cait convert``'s of one)."""
    if "model_config" not in header:
        return None
    allowed = METADATA_KEYS + HEADER_FILE_KEYS
    unknown = sorted(k for k in header if k not in allowed)
    if unknown:
        raise ValueError(
            f"{source}: bad checkpoint metadata: unknown header entries {unknown} "
            f"(known: {list(allowed)})"
        )
    meta = {}
    for key in METADATA_KEYS:
        if key not in header:
            continue  # check_metadata names it
        try:
            meta[key] = json.loads(header[key])
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source}: bad checkpoint metadata: {key} is not valid JSON ({err})"
            ) from None
    return check_metadata(meta, source)


def save_safetensors(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None,
    source: str | None = None,
    variant: str | None = None,
) -> None:
    """Write ``state_dict`` as safetensors, atomically, with :func:`encode_header`'s header."""
    header = encode_header(metadata, source, variant)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), header))


def _safetensors_header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


# ------------------------------------------------------------------ .pt


def save_pt(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    run: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{"model": state_dict, "metadata": metadata, "run": run}`` with ``torch.save``,
    atomically (``run`` is the state of the training run, left out when ``None``)."""
    contents: dict[str, Any] = {_WEIGHTS: state_dict, _METADATA: dict(metadata)}
    if run is not None:
        contents[_RUN] = run
    atomic_write(path, lambda tmp: torch.save(contents, tmp))


def decode_pt(obj: Any, source: str) -> tuple[ModelMetadata | None, dict[str, Any] | None]:
    """The checked metadata and the run state of a loaded ``.pt`` file: ``(None, None)`` for
    one without metadata (official weights, a plain state dict), a ``None`` run for one that
    no run wrote. Reads both layouts (module docstring)."""
    if not isinstance(obj, dict):
        return None, None
    if _METADATA in obj:
        unknown = sorted(str(k) for k in obj if k not in _PT_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown entries {unknown} (known: {list(_PT_KEYS)})")
        return check_metadata(obj[_METADATA], source), obj.get(_RUN)
    if "model_config" in obj:
        return _decode_old_pt(obj, source)
    return None, None


def _decode_old_pt(obj: dict[str, Any], source: str) -> tuple[ModelMetadata, dict[str, Any]]:
    """The layout before the "metadata" and "run" entries: the run's fields and the metadata
    but the name side by side at the top level, the name in the run's ``config`` (``model``
    being the weights)."""
    config = obj.get("config")
    name = config.get("model") if isinstance(config, dict) else obj.get("model")
    entries = METADATA_KEYS[1:]
    missing = [k for k in entries if k not in obj]
    if not isinstance(name, str) or missing:
        raise ValueError(
            f"{source} looks like a cait checkpoint but lacks its model name or {missing}"
        )
    meta = check_metadata({"model": name, **{k: obj[k] for k in entries}}, source)
    run = {k: v for k, v in obj.items() if k != _WEIGHTS and k not in entries}
    return meta, run


# ------------------------------------------------------------------ reading either kind


@dataclass(frozen=True)
class WeightsFile:
    """A weights file, read as far as its metadata.

    ``metadata`` is checked (``None`` for a file without: official or timm weights, a plain
    state dict); ``run`` is the state of the training run that wrote it (a run checkpoint's,
    else ``None``). ``shapes()`` and ``weights()`` give the tensors' shapes and the tensors
    (unwrapped) when called: a safetensors file's shapes come from its header alone.
    """

    metadata: ModelMetadata | None
    shapes: Callable[[], dict[str, tuple[int, ...]]]
    weights: Callable[[], dict[str, Tensor]]
    run: dict[str, Any] | None = None


def read_weights_file(path: Path, source: str | None = None) -> WeightsFile:
    """The local file ``path`` of either kind (by its suffix), read as far as its metadata
    (a ``.pt`` file is read whole, once: its size bounds it). Errors name ``path``; the
    tensors' errors name ``source`` (the path as the user gave it) when given."""
    source = source or str(path)
    if path.suffix == ".safetensors":
        metadata = decode_header(_safetensors_header(path), str(path))
        return WeightsFile(
            metadata, partial(safetensors_shapes, path), partial(_safetensors_weights, path)
        )
    contents = load_file_safely(path)
    metadata, run = decode_pt(contents, str(path))

    @cache
    def weights() -> dict[str, Tensor]:
        try:
            return unwrap_state_dict(contents)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    return WeightsFile(metadata, lambda: tensor_shapes(weights()), weights, run)


def _safetensors_weights(path: Path) -> dict[str, Tensor]:
    return unwrap_state_dict(load_file(str(path), device="cpu"))


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checked metadata of one of our checkpoints, or ``None`` for a file without it
    (official or timm weights, a plain state dict) or no file at all."""
    path = Path(path)
    if not path.is_file():
        return None
    metadata = read_weights_file(path).metadata
    return None if metadata is None else metadata.entries
