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
import math
from collections.abc import Callable, Mapping
from typing import Any

from cait.models.config import CaiTConfig, InputSpec
from cait.models.registry import get_variant

__all__ = [
    "CHECKPOINT_KEYS",
    "CROP_PCT_RANGE",
    "HEADER_FILE_KEYS",
    "INTERPOLATIONS",
    "MAX_CHANNELS",
    "MAX_CLASSES",
    "MAX_DEPTH",
    "MAX_IMG_SIZE",
    "MAX_WIDTH",
    "TIMM_MODEL_ARGS",
    "TIMM_PREFIX",
    "cait_config_of",
    "check_metadata",
    "check_timm_args",
    "decode_header",
    "input_spec_of",
]

TIMM_PREFIX = "timm:"
# The entries cait writes (cait.models.build.checkpoint_metadata); a run checkpoint keeps
# "model" in its config, since its own "model" entry holds the weights.
CHECKPOINT_KEYS = ("model", "model_config", "data_settings", "class_names")
# Safetensors header entries about the file, not the model: "format" (safetensors' own, "pt")
# and "source" (the file `cait convert` read). Read as strings, otherwise ignored.
HEADER_FILE_KEYS = ("format", "source")

# Bounds on what a checkpoint may ask for. They keep building the skeleton cheap (a block is a
# dozen Python modules even on the meta device) and an input tensor small (a 4096x4096 RGB
# float image is 200 MB); tensor sizes are checked against the file, not against these.
MAX_DEPTH = 1000  # blocks per stage; the deepest released CaiT has 48 (M48)
MAX_WIDTH = 65536  # embedding width; the widest released CaiT has 768
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,843
MAX_CHANNELS = 64  # input channels
MAX_IMG_SIZE = 4096  # pixels per side; the largest input of any timm pretrained config is 1024
# Eval crop ratio: the image is resized to img_size / crop_pct; timm's configs use 0.875-1.15.
CROP_PCT_RANGE = (0.25, 2.0)
# timm's interpolation names (timm.data.transforms.str_to_pil_interp)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

Check = Callable[[Any, str], Any]


def _integer(low: int, high: int) -> Check:
    def check(value: Any, where: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"{where} must be an integer in [{low}, {high}], got {value!r}")
        return value

    return check


def _number(low: float, high: float, *, high_open: bool = False) -> Check:
    def check(value: Any, where: str) -> float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and low <= value <= high) or (
            high_open and value == high
        ):
            bracket = ")" if high_open else "]"
            raise ValueError(f"{where} must be a number in [{low}, {high}{bracket}, got {value!r}")
        return float(value)

    return check


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _choice(*choices: str) -> Check:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value

    return check


def _sequence(item: Check, lengths: tuple[int, int]) -> Check:
    """A list or tuple of ``lengths[0]`` to ``lengths[1]`` values, each checked by ``item``
    (returned as a tuple)."""
    low, high = lengths
    count = f"{low}" if low == high else f"{low} to {high}"

    def check(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or not low <= len(value) <= high:
            raise ValueError(f"{where} must be a list of {count} values, got {value!r:.200}")
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


def _size(item: Check) -> Check:
    """An integer, or a pair of them (height, width) as timm takes image and patch sizes."""
    pair = _sequence(item, (2, 2))

    def check(value: Any, where: str) -> int | tuple[int, ...]:
        return pair(value, where) if isinstance(value, list | tuple) else item(value, where)

    return check


_RATE = _number(0.0, 1.0, high_open=True)

# The timm.create_model fields cait passes on, from training's model_args and from a
# checkpoint's model_config: plain sizes, rates and switches, each with its range. Everything
# else is refused, on purpose: whatever names a file or URL or makes timm load or download
# weights (pretrained, checkpoint_path, pretrained_cfg, pretrained_cfg_overlay, cache_dir,
# features_only, ...) and whatever takes a module or a callable (act_layer, norm_layer, ...).
TIMM_MODEL_ARGS: dict[str, Check] = {
    "num_classes": _integer(0, MAX_CLASSES),
    "in_chans": _integer(1, MAX_CHANNELS),
    "img_size": _size(_integer(1, MAX_IMG_SIZE)),
    "patch_size": _size(_integer(1, MAX_IMG_SIZE)),
    "embed_dim": _integer(1, MAX_WIDTH),
    "depth": _integer(1, MAX_DEPTH),
    "num_heads": _integer(1, MAX_WIDTH),
    "mlp_ratio": _number(0.0, 64.0),
    "depths": _sequence(_integer(0, MAX_DEPTH), (1, 16)),  # blocks per stage
    "dims": _sequence(_integer(1, MAX_WIDTH), (1, 16)),  # width per stage
    "drop_rate": _RATE,
    "drop_path_rate": _RATE,
    "attn_drop_rate": _RATE,
    "proj_drop_rate": _RATE,
    "pos_drop_rate": _RATE,
    "global_pool": _choice("", "avg", "max", "avgmax", "catavgmax", "token", "map"),
    "qkv_bias": _flag,
    "class_token": _flag,
    "reg_tokens": _integer(0, MAX_WIDTH),
    "output_stride": _integer(8, 64),
}


def check_timm_args(args: Any, where: str = "model_args") -> dict[str, Any]:
    """``args`` checked against :data:`TIMM_MODEL_ARGS` (lists become tuples); a field not
    in it, or out of its range, raises ``ValueError`` naming ``where.FIELD``."""
    if not isinstance(args, Mapping):
        raise ValueError(f"{where} must be a mapping, got {args!r}")
    checked = {}
    for key, value in args.items():
        check = TIMM_MODEL_ARGS.get(key) if isinstance(key, str) else None
        if check is None:
            raise ValueError(
                f"{where}.{key} is not a field cait passes to timm.create_model (allowed: "
                f"{sorted(TIMM_MODEL_ARGS)}; never paths, URLs or download switches)"
            )
        checked[key] = check(value, f"{where}.{key}")
    return checked


def _check_model_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"model must be a model name, got {name!r}")
    if name.startswith(TIMM_PREFIX):
        import timm

        if not timm.is_model(name.removeprefix(TIMM_PREFIX)):
            raise ValueError(f"model {name!r} is not in timm's registry")
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
    mean = _sequence(_number(-1e3, 1e3), (1, MAX_CHANNELS))
    std = _sequence(_number(1e-6, 1e3), (1, MAX_CHANNELS))
    checked = {
        "img_size": _integer(1, MAX_IMG_SIZE)(data["img_size"], "data_settings.img_size"),
        "crop_pct": _number(*CROP_PCT_RANGE)(data["crop_pct"], "data_settings.crop_pct"),
        "interpolation": _choice(*INTERPOLATIONS)(
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
        if name.startswith(TIMM_PREFIX):
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
