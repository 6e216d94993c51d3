"""Models by name for training and inference: our variants, or any timm model (``timm:NAME``).

A checkpoint records a model as a *spec*, ``{"model": name, "model_config": dict}``, from
which :func:`model_from_spec` rebuilds it without any other input.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cait.data import DataSettings
from cait.model import CaiT

__all__ = [
    "TIMM_PREFIX",
    "build_model",
    "default_settings",
    "is_timm",
    "model_from_spec",
    "model_spec",
]

TIMM_PREFIX = "timm:"


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def _timm_name(name: str) -> str:
    import timm

    bare = name[len(TIMM_PREFIX) :]
    if not timm.is_model(bare):
        raise ValueError(f"unknown timm model {bare!r} (see timm.list_models())")
    return bare


def build_model(name: str, model_args: dict[str, Any], num_classes: int) -> nn.Module:
    """A freshly initialised model with ``num_classes`` outputs."""
    if is_timm(name):
        import timm

        return timm.create_model(
            _timm_name(name), pretrained=False, num_classes=num_classes, **model_args
        )
    from cait.variants import create_model

    return create_model(name, **{**model_args, "num_classes": num_classes})


def model_spec(name: str, model: nn.Module, model_args: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``model``."""
    if isinstance(model, CaiT):
        return {"model": name, "model_config": model.config.to_dict()}
    return {
        "model": name,
        "model_config": {"num_classes": model.num_classes, **model_args},
    }


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the (untrained) model a checkpoint describes."""
    from cait.config import CaiTConfig

    name, config = spec["model"], dict(spec["model_config"])
    if is_timm(name):
        import timm

        return timm.create_model(_timm_name(name), pretrained=False, **config)
    return CaiT(CaiTConfig.from_dict(config))


def default_settings(name: str, model_args: dict[str, Any]) -> DataSettings:
    """Input size, eval crop, interpolation and normalisation a model expects by default."""
    if is_timm(name):
        import timm

        cfg = timm.get_pretrained_cfg(_timm_name(name))
        return DataSettings(
            img_size=int(cfg.input_size[-1]) if cfg else 224,
            crop_pct=cfg.crop_pct if cfg else 0.875,
            interpolation=cfg.interpolation if cfg else "bicubic",
            mean=tuple(cfg.mean) if cfg else (0.485, 0.456, 0.406),
            std=tuple(cfg.std) if cfg else (0.229, 0.224, 0.225),
        )
    from cait.variants import get_variant

    variant = get_variant(name)
    config = variant.config.replace(**model_args)
    return DataSettings(
        config.img_size, variant.crop_pct, variant.interpolation, variant.mean, variant.std
    )
