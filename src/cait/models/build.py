"""A model by name or from a checkpoint: the one place that answers "give me the model for this".

Names are our variants (``cait models``) or any timm model as ``timm:NAME``. A checkpoint
describes its model with a few metadata entries, enough to rebuild it without any other
input; what a file holds and how it is read is :mod:`cait.models.weights_file`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from cait.files import OutputLock, first_line
from cait.models.cait import CaiT
from cait.models.config import CaiTConfig, pretrained_cfg
from cait.models.pretrained import (
    check_tensors_fit,
    is_remote,
    load_pretrained,
    local_checkpoint,
    read_state_dict,
    tensor_shapes,
)
from cait.models.registry import InputSpec, create_model, get_variant
from cait.models.timm_interop import (
    check_timm_args,
    imagenet_class_names,
    is_timm,
    timm_input_spec,
    timm_model,
)
from cait.models.weights_file import (
    ModelMetadata,
    WeightsFile,
    read_weights_file,
    save_safetensors,
)

__all__ = [
    "TORCHVISION_PREFIX",
    "LoadedModel",
    "build_model",
    "convert_checkpoint",
    "input_spec",
    "load_for_inference",
    "model_from_metadata",
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


def model_from_metadata(meta: ModelMetadata, source: str = "checkpoint") -> nn.Module:
    """Rebuild the (untrained) model a checkpoint describes, from the checked values of its
    metadata only (``source`` names the file in messages)."""
    if isinstance(meta.config, CaiTConfig):
        return CaiT(meta.config)
    try:
        return timm_model(meta.name, **meta.config)
    except TypeError as err:  # a field this timm model's constructor does not take
        raise ValueError(
            f"{source}: {meta.name} cannot be built from its model_config ({err})"
        ) from None


def _check_fit(
    build: Callable[[], nn.Module],
    shapes: dict[str, tuple[int, ...]],
    checkpoint: str,
    what: str,
) -> None:
    """Raise unless ``build()``'s model, built on the meta device (no memory), has exactly the
    file's tensor names and shapes (``what`` names the model in the error, see
    :func:`~cait.models.pretrained.check_tensors_fit`)."""
    with torch.device("meta"):
        skeleton = build()
    check_tensors_fit(skeleton, shapes, checkpoint, what)


def _open(checkpoint: str) -> WeightsFile:
    """The weights file ``checkpoint`` names: a local file of either kind, or a URL or Hub
    repository (which holds no metadata, and is downloaded when its weights are asked for)."""
    if is_remote(checkpoint):
        weights = cache(partial(read_state_dict, checkpoint))
        return WeightsFile(None, lambda: tensor_shapes(weights()), weights)
    return read_weights_file(local_checkpoint(checkpoint), checkpoint)


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
    file = _open(checkpoint)
    meta = file.metadata
    if meta is None and model_name is None:
        raise ValueError(
            f"{checkpoint} is not a cait checkpoint (it carries no model config): pass "
            "`model_name`, the variant its weights are for"
        )
    if meta is None:
        variant = get_variant(model_name)  # an unknown name is refused before any download
        head = file.shapes().get("head.weight")
        default = variant.config.num_classes
        num_classes = head[0] if head is not None and len(head) == 2 else default
        build = partial(create_model, model_name, num_classes=num_classes)
        what = "the model"
    else:
        build = partial(model_from_metadata, meta, source=checkpoint)
        what = "the model its metadata describes"
    _check_fit(build, file.shapes(), checkpoint, what)  # before allocating the model
    model = build()
    model.load_state_dict(file.weights(), strict=True)
    return _loaded(model.eval(), meta, model_name)


def _loaded(model: nn.Module, meta: ModelMetadata | None, model_name: str | None) -> LoadedModel:
    """``model`` with what its metadata says it takes and answers; without metadata, the
    variant's input spec and, for 1000 classes, ImageNet's class names."""
    if meta is None:
        names = folders = None
        if model.num_classes == 1000:
            folders, names = imagenet_class_names()
        return LoadedModel(model, get_variant(model_name).input_spec, names, folders)
    if isinstance(model, CaiT):  # timm's data config then gives the checkpoint's inputs
        model.pretrained_cfg = pretrained_cfg(model.config, meta.inputs, architecture=meta.name)
    names = folders = meta.class_names
    return LoadedModel(model, meta.inputs, names, folders)


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model_name: str | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Tensor]:
    """Convert a checkpoint (official, timm's, a plain state dict or one of ours) to a
    safetensors file; returns its tensors.

    One of ours keeps its metadata (the model, its input settings and class names), once its
    tensors are checked against the model it describes; ``model_name``, if given, must be
    that model. Any other file, with ``model_name``, is first loaded strictly into that
    variant (whose name the header then records). A file that does not fit is refused
    before anything is written. An existing ``dst`` is replaced only with ``overwrite``,
    and only if it is a safetensors file (never a folder or another kind of file); one
    process at a time writes ``dst``, others are refused.
    """
    dst = Path(dst)
    _check_destination(dst, overwrite)  # before reading: a refusal costs nothing
    source = str(src)
    file = _open(source)
    state_dict = file.weights()
    meta = file.metadata
    if meta is not None:
        if model_name not in (None, meta.name):
            raise ValueError(f"{source} holds a checkpoint of {meta.name}, not of {model_name}")
        build = partial(model_from_metadata, meta, source=source)
        _check_fit(build, tensor_shapes(state_dict), source, "the model its metadata describes")
    elif model_name is not None:
        load_pretrained(create_model(model_name), state_dict)
    entries = None if meta is None else meta.entries
    variant = model_name if meta is None else None  # the metadata names the model
    with OutputLock(dst, what="cait convert"):
        _check_destination(dst, overwrite)  # again: it may have appeared meanwhile
        save_safetensors(state_dict, dst, entries, source=Path(source).name, variant=variant)
    return state_dict


def _check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse a ``dst`` that convert cannot write or may not replace: a name without
    ``.safetensors``, an existing one without ``overwrite``, and, even with it, anything
    convert does not write (a folder, a file that is not safetensors)."""
    if dst.suffix != ".safetensors":
        raise ValueError(f"destination must end with .safetensors, got {dst.name}")
    if not os.path.lexists(dst):
        return
    if dst.is_dir():
        raise ValueError(f"{dst} is a folder; convert writes one .safetensors file")
    if not overwrite:
        raise ValueError(f"{dst} exists: refusing to replace it without `overwrite`")
    if not dst.is_file():  # a dangling link, a pipe or a device: opening it could block
        raise ValueError(f"{dst} is not a regular file: refusing to replace it")
    try:
        with safe_open(str(dst), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{dst} is not a safetensors file ({first_line(err)}): refusing to replace it, "
            "even with `overwrite`; choose another destination"
        ) from None
