"""A model by name or from a checkpoint: the one place that answers "give me the model for this".

Names are our variants (``cait models``) or any timm model as ``timm:NAME``. A checkpoint
describes its model with a few metadata entries (:func:`checkpoint_metadata`): the name, the
full ``model_config`` (enough to rebuild it without any other input), the input spec and the
class names. Run checkpoints (``last.pt``, ``best.pt``) hold them beside the weights;
``model.safetensors`` holds them JSON-encoded in its header.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from cait.files import load_file_safely
from cait.models.cait import CaiT
from cait.models.config import pretrained_cfg
from cait.models.metadata import cait_config_of, check_metadata, decode_header, input_spec_of
from cait.models.pretrained import (
    check_tensors_fit,
    convert_weights,
    is_remote,
    local_checkpoint,
    read_state_dict,
    safetensors_shapes,
    tensor_shapes,
    unwrap_state_dict,
)
from cait.models.registry import InputSpec, create_model, get_variant
from cait.models.timm_interop import (
    check_timm_args,
    imagenet_class_names,
    is_timm,
    timm_input_spec,
    timm_model,
)

__all__ = [
    "TORCHVISION_PREFIX",
    "LoadedModel",
    "build_model",
    "checkpoint_metadata",
    "convert_checkpoint",
    "input_spec",
    "load_for_inference",
    "model_from_spec",
    "model_spec",
    "read_checkpoint_metadata",
    "torchvision_model",
]

TORCHVISION_PREFIX = "torchvision:"


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    """An untrained torchvision model from ``torchvision:NAME``."""
    import torchvision

    bare = name.removeprefix(TORCHVISION_PREFIX)
    try:
        return torchvision.models.get_model(bare, weights=None, **kwargs)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model {bare!r}") from err


def build_model(name: str, model_args: dict[str, Any], num_classes: int) -> nn.Module:
    """A freshly initialised model with ``num_classes`` outputs. A timm model takes only the
    fields of :data:`~cait.models.timm_interop.TIMM_MODEL_ARGS`, so that every checkpoint cait
    writes is one it reads back."""
    if is_timm(name):
        return timm_model(
            name, **check_timm_args(model_args, "model_args"), num_classes=num_classes
        )
    return create_model(name, **{**model_args, "num_classes": num_classes})


def input_spec(name: str, model_args: dict[str, Any] | None = None) -> InputSpec:
    """Input size, eval crop, interpolation and normalisation a model expects by default.

    For our variants ``model_args`` are checked (an unknown field raises) and an
    ``img_size`` among them changes the size.
    """
    if is_timm(name):
        return timm_input_spec(name)
    variant = get_variant(name)
    config = variant.config.replace(**(model_args or {}))
    return variant.input_spec.replace(img_size=config.img_size)


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


def model_from_spec(spec: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the (untrained) model a checkpoint describes, from the checked values of its
    metadata only (:func:`cait.models.metadata.check_metadata`; ``source`` names the file in
    messages)."""
    name = spec["model"]
    if is_timm(name):
        args = check_timm_args(spec["model_config"], "model_config")
        try:
            return timm_model(name, **args)
        except TypeError as err:  # a field this timm model's constructor does not take
            raise ValueError(
                f"{source}: {name} cannot be built from its model_config ({err})"
            ) from None
    return CaiT(cait_config_of(spec))


def checkpoint_metadata(
    spec: dict[str, Any], inputs: InputSpec, class_names: list[str]
) -> dict[str, Any]:
    """The entries that describe a model in every checkpoint cait writes."""
    return {
        "model": spec["model"],
        "model_config": spec["model_config"],
        "data_settings": inputs.to_dict(),
        "class_names": list(class_names),
    }


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The metadata of one of our checkpoints (see :func:`checkpoint_metadata`), checked
    against the schema of :mod:`cait.models.metadata`, or ``None`` for a file without it
    (official or timm weights, a plain state dict)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        return decode_header(_safetensors_header(path), str(path))
    return _metadata_in(load_file_safely(path), path)


def _safetensors_header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


def _metadata_in(obj: Any, path: Path) -> dict[str, Any] | None:
    """The checked metadata of a loaded torch checkpoint (``None`` for a file without it)."""
    if not (isinstance(obj, dict) and "model_config" in obj):
        return None
    # a run checkpoint keeps the name in its config ("model" holds the weights)
    config = obj.get("config")
    name = config.get("model") if isinstance(config, dict) else obj.get("model")
    missing = [k for k in ("model_config", "data_settings", "class_names") if k not in obj]
    if not isinstance(name, str) or missing:
        raise ValueError(
            f"{path} looks like a cait checkpoint but lacks its model name or {missing}"
        )
    entries = {k: obj[k] for k in ("model_config", "data_settings", "class_names")}
    return check_metadata({"model": name, **entries}, str(path))


def _fitted_model(
    build: Callable[[], nn.Module],
    shapes: dict[str, tuple[int, ...]],
    checkpoint: str,
    what: str,
) -> nn.Module:
    """``build()``'s model, built for real only once its skeleton (built on the meta device:
    no memory) has exactly the file's tensor names and shapes (``what`` names the model in
    the error, see :func:`~cait.models.pretrained.check_tensors_fit`)."""
    with torch.device("meta"):
        skeleton = build()
    check_tensors_fit(skeleton, shapes, checkpoint, what)
    return build()


@dataclass
class LoadedModel:
    """A model in eval mode with its input spec.

    ``class_names`` are for display; ``folder_names`` are the class folder names the model's
    indices correspond to (the same for our checkpoints; WordNet synsets such as
    ``n01440764`` for ImageNet weights, whose display names are the synset lemmas).
    """

    model: nn.Module
    settings: InputSpec
    class_names: list[str] | None
    folder_names: list[str] | None


def load_for_inference(checkpoint: str, model_name: str | None = None) -> LoadedModel:
    """A model ready for evaluation, with its input spec and class names.

    Our checkpoints (``last.pt``, ``best.pt``, ``model.safetensors``) carry their config;
    for official or timm weights, name the variant with ``model_name`` (the head's size then
    comes from the file). Loading is strict: a tensor of another shape than the model's, a
    missing or an unexpected tensor is a one-line ``ValueError`` naming it, found before
    the model is allocated.
    """
    described = "the model its metadata describes"
    # the weights of a file without metadata, read only once a model name is known to fit
    # them to (a local torch file is read once, below, and its contents kept)
    weights: Callable[[], dict[str, Tensor]] = partial(read_state_dict, checkpoint)
    if not is_remote(checkpoint):  # a URL or Hub repo holds no metadata
        path = local_checkpoint(checkpoint)
        if path.suffix == ".safetensors":  # the header holds the metadata and the shapes
            meta = read_checkpoint_metadata(path)
            if meta is not None:
                build = partial(model_from_spec, meta, source=checkpoint)
                model = _fitted_model(build, safetensors_shapes(path), checkpoint, described)
                model.load_state_dict(read_state_dict(path), strict=True)
                return _loaded(model, meta)
        else:  # read once, for the metadata and the weights; the file size bounds it
            contents = load_file_safely(path)
            weights = partial(_state_dict_in, contents, checkpoint)
            meta = _metadata_in(contents, path)
            if meta is not None:
                state_dict = weights()
                build = partial(model_from_spec, meta, source=checkpoint)
                model = _fitted_model(build, tensor_shapes(state_dict), checkpoint, described)
                model.load_state_dict(state_dict, strict=True)
                return _loaded(model, meta)
    if model_name is None:
        raise ValueError(
            f"{checkpoint} is not a cait checkpoint (it carries no model config): pass "
            "`model_name`, the variant its weights are for"
        )
    variant = get_variant(model_name)
    state_dict = weights()
    head = state_dict.get("head.weight")
    num_classes = (
        head.shape[0] if head is not None and head.ndim == 2 else variant.config.num_classes
    )
    build = partial(create_model, model_name, num_classes=num_classes)
    model = _fitted_model(build, tensor_shapes(state_dict), checkpoint, "the model")
    model.load_state_dict(state_dict, strict=True)
    folders, names = imagenet_class_names() if num_classes == 1000 else (None, None)
    return LoadedModel(model.eval(), variant.input_spec, names, folders)


def _state_dict_in(obj: Any, checkpoint: str) -> dict[str, Any]:
    try:
        return unwrap_state_dict(obj)
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err}") from None


def _loaded(model: nn.Module, meta: dict[str, Any]) -> LoadedModel:
    settings = input_spec_of(meta)
    if isinstance(model, CaiT):  # timm's data config then gives the checkpoint's inputs
        model.pretrained_cfg = pretrained_cfg(model.config, settings, architecture=meta["model"])
    names = folders = list(meta["class_names"])
    return LoadedModel(model.eval(), settings, names, folders)


def convert_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], model_name: str | None = None
) -> dict[str, Any]:
    """Convert an official (or any supported) checkpoint to a plain safetensors file.

    With ``model_name`` the weights are first loaded strictly into that variant, so a file
    that does not fit it is refused before anything is written.
    """
    if model_name is None:
        return convert_weights(src, dst)
    return convert_weights(src, dst, create_model(model_name), {"model": model_name})
