"""The metadata cait reads from a checkpoint: a closed schema, checked before anything is built.

A checkpoint is untrusted input (STYLE principle 13): what it says about its model is data,
never keyword arguments. The schema has four entries, the ones
:func:`cait.models.build.checkpoint_metadata` writes:

- ``model``: one of our variants (``cait models``) or ``timm:NAME`` in timm's registry;
- ``model_config``: for our variants every ``CaiTConfig`` field (unknown fields raise); for a
  timm model the plain constructor fields of :data:`TIMM_MODEL_ARGS`, ``num_classes``
  included;
- ``data_settings``: the five fields of ``InputSpec``, each in a sane range;
- ``class_names``: one string per class of the model.

A ``model.safetensors`` header holds them JSON-encoded beside two entries about the file
itself (:data:`HEADER_FILE_KEYS`); any other header entry is refused. Sizes are bounded here
only as far as building the model's skeleton (on the meta device) needs: whether the sizes
fit the file's tensors is checked by the loader, before any real allocation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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
from cait.models.registry import get_variant
from cait.models.timm_interop import check_timm_args, check_timm_name, is_timm

__all__ = [
    "CHECKPOINT_KEYS",
    "HEADER_FILE_KEYS",
    "cait_config_of",
    "check_metadata",
    "decode_header",
    "input_spec_of",
]

# The entries cait writes (cait.models.build.checkpoint_metadata); a run checkpoint keeps
# "model" in its config, since its own "model" entry holds the weights.
CHECKPOINT_KEYS = ("model", "model_config", "data_settings", "class_names")
# Safetensors header entries about the file, not the model: "format" (safetensors' own, "pt")
# and "source" (the file `cait convert` read). Read as strings, otherwise ignored.
HEADER_FILE_KEYS = ("format", "source")


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


def check_metadata(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``meta`` checked against the schema (module docstring), as it is; any problem raises a
    one-line ``ValueError`` naming ``source`` (the file) and the field. Returns the four
    entries. The model config's numbers are then read through
    :func:`cait.models.build.model_from_spec`, which builds from checked values only."""
    try:
        unknown = sorted(str(k) for k in meta if k not in CHECKPOINT_KEYS)
        missing = [k for k in CHECKPOINT_KEYS if k not in meta]
        if unknown or missing:
            raise ValueError(
                f"the entries must be {list(CHECKPOINT_KEYS)}; unknown {unknown}, missing {missing}"
            )
        name = _check_model_name(meta["model"])
        if is_timm(name):
            args = check_timm_args(meta["model_config"], "model_config")
            if "num_classes" not in args:
                raise ValueError("model_config of a timm model must give num_classes")
            num_classes = args["num_classes"]
        else:
            num_classes = _check_cait_config(meta["model_config"]).num_classes
        _check_input_spec(meta["data_settings"])
        _check_class_names(meta["class_names"], num_classes)
    except ValueError as err:
        raise ValueError(f"{source}: bad checkpoint metadata: {err}") from None
    return {k: meta[k] for k in CHECKPOINT_KEYS}


def input_spec_of(meta: Mapping[str, Any]) -> InputSpec:
    """The checked ``data_settings`` of metadata that :func:`check_metadata` accepted."""
    return _check_input_spec(meta["data_settings"])


def cait_config_of(meta: Mapping[str, Any]) -> CaiTConfig:
    """The checked ``CaiTConfig`` of metadata that :func:`check_metadata` accepted."""
    return _check_cait_config(meta["model_config"])


def decode_header(header: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """The metadata in a safetensors header, JSON-decoded and checked, or ``None`` for a
    header without a model config (timm's, an official file's, ``cait convert``'s)."""
    if "model_config" not in header:
        return None
    allowed = CHECKPOINT_KEYS + HEADER_FILE_KEYS
    unknown = sorted(k for k in header if k not in allowed)
    if unknown:
        raise ValueError(
            f"{source}: bad checkpoint metadata: unknown header entries {unknown} "
            f"(known: {list(allowed)})"
        )
    meta = {}
    for key in CHECKPOINT_KEYS:
        if key not in header:
            continue  # check_metadata names it
        try:
            meta[key] = json.loads(header[key])
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source}: bad checkpoint metadata: {key} is not valid JSON ({err})"
            ) from None
    return check_metadata(meta, source)
