"""timm interop, both directions: one home for what cait knows of timm.

- Names: ``timm:NAME`` names any model in timm's registry; its constructor takes only the
  checked fields of :data:`TIMM_MODEL_ARGS` (never paths, URLs or download switches).
- timm -> cait: an untrained timm model, its input spec (timm's ``pretrained_cfg``), the
  ImageNet class names timm ships.
- cait -> timm: the timm architecture and ``model_args`` that express a :class:`CaiT`, its
  weights under timm's names, the ``config.json`` timm reads, the Hub folder layout
  (``config.json`` + ``model.safetensors``) and building timm's model from such a folder.

The Hub itself (download, upload) is :mod:`cait.models.hub`. ``timm`` is imported only inside
the functions that need it, so importing cait does not import timm.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from cait.files import atomic_write
from cait.models.cait import CaiT
from cait.models.checks import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_DEPTH,
    MAX_IMG_SIZE,
    MAX_WIDTH,
    RATE,
    Check,
    choice,
    flag,
    integer,
    number,
    sequence,
    size,
)
from cait.models.config import CaiTConfig
from cait.models.hub import HUB_CONFIG, HUB_WEIGHTS
from cait.models.registry import IMAGENET_MEAN, IMAGENET_STD, InputSpec, get_variant, list_models

__all__ = [
    "OTHER_FORMATS_HINT",
    "TIMM_MODEL_ARGS",
    "TIMM_PREFIX",
    "check_timm_args",
    "check_timm_name",
    "imagenet_class_names",
    "is_timm",
    "timm_architecture",
    "timm_from_folder",
    "timm_hub_config",
    "timm_input_spec",
    "timm_model",
    "timm_state_dict",
    "write_hub_folder",
]

TIMM_PREFIX = "timm:"
# timm's fallbacks for a model without a pretrained config (timm.data.resolve_data_config)
_TIMM_DEFAULT_SPEC = InputSpec(224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
OTHER_FORMATS_HINT = "export it with --format onnx or --format pt2 instead"


# ------------------------------------------------------------------ names and model args

# The timm.create_model fields cait passes on, from training's model_args and from a
# checkpoint's model_config: plain sizes, rates and switches, each with its range. Everything
# else is refused, on purpose: whatever names a file or URL or makes timm load or download
# weights (pretrained, checkpoint_path, pretrained_cfg, pretrained_cfg_overlay, cache_dir,
# features_only, ...) and whatever takes a module or a callable (act_layer, norm_layer, ...).
TIMM_MODEL_ARGS: dict[str, Check] = {
    "num_classes": integer(0, MAX_CLASSES),
    "in_chans": integer(1, MAX_CHANNELS),
    "img_size": size(integer(1, MAX_IMG_SIZE)),
    "patch_size": size(integer(1, MAX_IMG_SIZE)),
    "embed_dim": integer(1, MAX_WIDTH),
    "depth": integer(1, MAX_DEPTH),
    "num_heads": integer(1, MAX_WIDTH),
    "mlp_ratio": number(0.0, 64.0),
    "depths": sequence(integer(0, MAX_DEPTH), (1, 16)),  # blocks per stage
    "dims": sequence(integer(1, MAX_WIDTH), (1, 16)),  # width per stage
    "drop_rate": RATE,
    "drop_path_rate": RATE,
    "attn_drop_rate": RATE,
    "proj_drop_rate": RATE,
    "pos_drop_rate": RATE,
    "global_pool": choice("", "avg", "max", "avgmax", "catavgmax", "token", "map"),
    "qkv_bias": flag,
    "class_token": flag,
    "reg_tokens": integer(0, MAX_WIDTH),
    "output_stride": integer(8, 64),
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


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def check_timm_name(name: str) -> str:
    """``timm:NAME`` -> ``NAME``, checked against timm's registry."""
    import timm

    bare = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(bare):
        raise ValueError(f"unknown timm model {bare!r} (see timm.list_models())")
    return bare


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """An untrained timm model from ``timm:NAME`` (or a bare timm name), built from the
    fields of :data:`TIMM_MODEL_ARGS` only."""
    import timm

    kwargs = check_timm_args(kwargs, "timm model")
    return timm.create_model(check_timm_name(name), pretrained=False, **kwargs)


def timm_input_spec(name: str) -> InputSpec:
    """Input size, eval crop, interpolation and normalisation of ``timm:NAME`` (timm's
    ``pretrained_cfg``, or timm's defaults for a model without one)."""
    import timm

    cfg = timm.get_pretrained_cfg(check_timm_name(name))
    if cfg is None:
        return _TIMM_DEFAULT_SPEC
    return InputSpec(int(cfg.input_size[-1]), cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)


def imagenet_class_names() -> tuple[list[str], list[str]]:
    """ImageNet-1k synsets (sorted, the index order of the released weights) and names."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return list(info.label_names()), list(info.label_descriptions())


# ------------------------------------------------------------------------ cait -> timm

# What a CaiTConfig must be for timm's ``Cait`` (timm/models/cait.py): a class token that
# enters late, through class attention, LayerScale, talking heads in the SA blocks, no
# distillation token. timm's ViT (``VisionTransformer``, and ``VisionTransformerDistilled``
# for a distillation token: the DeiT models) takes plain attention, pre-norm residuals with
# or without LayerScale, and a class token at the input or none at all.


def _is_timm_cait(c: CaiTConfig) -> bool:
    return c.class_token == "late" and c.has_class_token


def _timm_gaps(c: CaiTConfig, global_pool: str) -> list[str]:
    """What timm cannot express of ``c`` read through ``global_pool``; empty when it can."""
    gaps = []
    if c.branch_scale not in ("layerscale", "none"):
        gaps.append(f"branch_scale={c.branch_scale!r} (timm has LayerScale or nothing)")
    if _is_timm_cait(c):
        if not c.talking_heads:
            gaps.append("class attention with plain (not talking-heads) self-attention")
        if c.branch_scale != "layerscale":
            gaps.append("class attention without LayerScale")
        if c.distilled:
            gaps.append("a distillation token in the class-attention stage")
    elif c.talking_heads:
        gaps.append("talking heads without a class-attention stage")
    if c.distilled and global_pool != "token":  # timm's distilled DeiT reads both tokens
        gaps.append(f"a distillation token read with global_pool={global_pool!r}")
    return gaps


def _closest_released(config: CaiTConfig, names: list[str]) -> str:
    """The released variant closest to ``config``: nearest width first, then depth, then
    the same input size (``model_args`` set every field; the name is for people reading
    the Hub)."""

    def distance(name: str) -> tuple[int, int, bool]:
        v = get_variant(name).config
        return (
            abs(v.embed_dim - config.embed_dim),
            abs(v.depth - config.depth),
            (v.img_size, v.patch_size) != (config.img_size, config.patch_size),
        )

    return min(names, key=distance)


def timm_architecture(
    config: CaiTConfig, global_pool: str | None = None, dynamic_size: bool = False
) -> tuple[str, dict[str, Any]]:
    """timm's model name and the ``model_args`` that make it ``config``, its head reading
    the tokens by ``global_pool`` (the model's; ``config.pooling`` by default).

    The name is a released variant (the closest by width and depth) and the arguments set
    every architecture field, so the folder does not depend on timm's defaults. A config
    timm cannot express raises ``ValueError`` naming what timm lacks.
    """
    global_pool = config.pooling if global_pool is None else global_pool
    gaps = _timm_gaps(config, global_pool)
    if gaps:
        raise ValueError(f"timm has no model with {'; '.join(gaps)}: {OTHER_FORMATS_HINT}")
    c = config
    args: dict[str, Any] = {
        "img_size": c.img_size,
        "patch_size": c.patch_size,
        "in_chans": c.in_chans,
        "embed_dim": c.embed_dim,
        "depth": c.depth,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio,
        "qkv_bias": c.qkv_bias,
        "global_pool": global_pool,
    }
    released = [n for n in list_models() if get_variant(n).hf_hub_id is not None]
    if _is_timm_cait(c):
        if dynamic_size:
            raise ValueError(
                "timm's Cait takes one input size (it has no dynamic_img_size): export without "
                "dynamic height and width, or with --format onnx"
            )
        names = [n for n in released if n.startswith("cait_")]
        args.update(
            init_values=c.init_scale,
            depth_token_only=c.ca_depth,
            mlp_ratio_token_only=c.mlp_ratio,
        )
        return _closest_released(c, names), args
    names = [n for n in released if n.startswith("deit_") and get_variant(n).config.distilled]
    if not c.distilled:
        names = [
            n for n in released if n.startswith("deit_") and not get_variant(n).config.distilled
        ]
    if c.branch_scale == "layerscale":
        args["init_values"] = c.init_scale
    if global_pool == "avg":  # normalise every token, then average the patches (as we do)
        args["fc_norm"] = False
    if not c.has_class_token:
        args["class_token"] = False
    if dynamic_size:
        args["dynamic_img_size"] = True
    return _closest_released(c, names), args


def timm_state_dict(model: CaiT) -> dict[str, Tensor]:
    """The model's weights under timm's names.

    Ours are timm's for CaiT and DeiT; only LayerScale in a ViT differs (timm's
    ``blocks.i.ls1.gamma`` for our ``blocks.i.gamma_1``, as in its Cait models).
    """
    vit_layerscale = model.config.class_token == "early" or model.config.pooling == "avg"
    out = {}
    for key, value in model.state_dict().items():
        if vit_layerscale and key.startswith("blocks.") and key.endswith((".gamma_1", ".gamma_2")):
            key = f"{key[: -len('gamma_1')]}ls{key[-1]}.gamma"
        out[key] = value.detach().contiguous().cpu()
    return out


def timm_hub_config(
    model: CaiT,
    input_spec: InputSpec,
    label_names: Sequence[str] | None = None,
    label_descriptions: Sequence[str] | None = None,
    dynamic_size: bool = False,
) -> dict[str, Any]:
    """The ``config.json`` timm reads from a Hub repo or a local folder for ``model``
    (``timm.models.load_model_config_from_path``): architecture, ``model_args``, and the
    ``pretrained_cfg`` that says how to feed it (from ``input_spec``)."""
    c = model.config
    architecture, model_args = timm_architecture(
        c, getattr(model, "global_pool", None), dynamic_size
    )
    # the model's own timm cfg names its layers; the input values come from input_spec,
    # which the checkpoint recorded
    own = getattr(model, "pretrained_cfg", None)
    own = own if isinstance(own, dict) else {}
    classifier = own.get("classifier", ("head", "head_dist") if c.distilled else "head")
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "num_features": c.embed_dim,
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [c.in_chans, input_spec.img_size, input_spec.img_size],
            "fixed_input_size": not dynamic_size,
            "interpolation": input_spec.interpolation,
            "crop_pct": input_spec.crop_pct,
            "crop_mode": "center",
            "mean": list(input_spec.mean),
            "std": list(input_spec.std),
            "num_classes": model.num_classes,
            "pool_size": None,
            "first_conv": own.get("first_conv", "patch_embed.proj"),
            "classifier": list(classifier) if isinstance(classifier, tuple) else classifier,
            **({"license": own["license"]} if "license" in own else {}),
        },
    }
    if label_names is not None and len(label_names) == model.num_classes:
        config["label_names"] = list(label_names)
        if label_descriptions is not None and list(label_descriptions) != list(label_names):
            config["label_descriptions"] = dict(zip(label_names, label_descriptions, strict=True))
    return config


def write_hub_folder(
    folder: Path, config: Mapping[str, Any], weights: Mapping[str, Tensor]
) -> None:
    """``config.json`` and ``model.safetensors`` in ``folder``, each written atomically."""
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / HUB_CONFIG, lambda tmp: tmp.write_text(text))
    atomic_write(
        folder / HUB_WEIGHTS, lambda tmp: save_file(dict(weights), str(tmp), {"format": "pt"})
    )


def timm_from_folder(folder: Path) -> nn.Module:
    """timm's own model from a folder in the Hub layout, in eval mode
    (``timm.create_model("local-dir:FOLDER", pretrained=True)``)."""
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
