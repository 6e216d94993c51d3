"""Reading, adapting and strictly loading checkpoints.

Sources: an ``http(s)://`` URL, a Hugging Face Hub repository written as timm writes it
(``hf-hub:timm/cait_xxs24_224.fb_dist_in1k``), and anything else is a local file (the official
``.pth`` whose ``"model"`` entry holds ``module.``-prefixed keys, a plain state dict, a timm
``.safetensors`` file, or one of our training checkpoints). A local path is never sent to the
network: one that does not exist is "checkpoint not found". Loading never unpickles arbitrary
objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from cait.files import first_line, load_file_safely
from cait.models.cait import CaiT
from cait.models.hub import (
    HUB_PREFIX,
    download_hub_weights,
    is_hub_id,
    looks_like_repo_id,
)
from cait.models.layers import resample_pos_embed

__all__ = [
    "LoadReport",
    "adapt_state_dict",
    "check_tensors_fit",
    "checkpoint_not_found",
    "describe_state_dict",
    "is_remote",
    "load_pretrained",
    "local_checkpoint",
    "read_state_dict",
    "safetensors_shapes",
    "tensor_shapes",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

# Prefixes added by DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Entries of a checkpoint dict that may hold the state dict (official: "model").
_STATE_DICT_ENTRIES = ("model", "state_dict")
_URL_SCHEMES = ("http://", "https://")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)
    resized_pos_embed: tuple[int, int] | None = None
    reset_head: bool = False
    initialised_dist_token: bool = False


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """The tensors of a checkpoint object, with wrapper entries and key prefixes removed."""
    if isinstance(obj, Mapping):
        for entry in _STATE_DICT_ENTRIES:
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj)}")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; "
                "is this a state dict?"
            )
        out[_unwrapped(key)] = value
    return out


def _unwrapped(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def is_remote(text: str) -> bool:
    """Whether a source is fetched over the network: an ``http(s)://`` URL or a Hub repo."""
    return text.startswith(_URL_SCHEMES) or is_hub_id(text)


def checkpoint_not_found(text: str) -> FileNotFoundError:
    """The error for a local checkpoint path that does not exist (one line; a path that
    reads like ``owner/name`` gets the Hub spelling as a hint)."""
    if looks_like_repo_id(text):
        return FileNotFoundError(
            f"checkpoint not found: {text} (no such file; a Hugging Face Hub repository is "
            f"written {HUB_PREFIX}{text})"
        )
    return FileNotFoundError(f"checkpoint not found: {text} (not a file, URL or Hub id)")


def local_checkpoint(text: str) -> Path:
    """The path of a local checkpoint file: a missing path is ``FileNotFoundError`` and a
    directory ``ValueError``, both one line."""
    if text.startswith(HUB_PREFIX):
        raise ValueError(f"{text} is not a Hugging Face Hub repository ({HUB_PREFIX}owner/name)")
    path = Path(text).expanduser()
    if not path.exists():
        raise checkpoint_not_found(text)
    if path.is_dir():
        raise ValueError(f"{text} is a directory, not a checkpoint file")
    return path


def read_state_dict(source: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from a path, URL or Hugging Face Hub repo (see the module
    docstring)."""
    text = str(source)
    if text.startswith(_URL_SCHEMES):
        try:
            obj = torch.hub.load_state_dict_from_url(
                text, map_location="cpu", weights_only=True, check_hash=False
            )
        except OSError as err:  # offline, refused, HTTP errors (urllib's URLError is one)
            raise FileNotFoundError(
                f"checkpoint not found: could not download {text} ({first_line(err)})"
            ) from err
        return unwrap_state_dict(obj)
    if is_hub_id(text):
        return unwrap_state_dict(load_file_safely(download_hub_weights(text)))
    return unwrap_state_dict(load_file_safely(local_checkpoint(text)))


def safetensors_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors header declares (wrapper prefixes removed), read from
    the header alone: no tensor is loaded."""
    with safe_open(str(path), framework="pt") as f:
        return {_unwrapped(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def tensor_shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of a state dict, by name."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def check_tensors_fit(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str, what: str
) -> None:
    """Raise a one-line ``ValueError`` unless ``shapes`` (a file's tensors) are exactly the
    names and shapes of ``model``'s state dict (``model`` may live on the meta device, so
    this costs no allocation). ``what`` says which model (``the model``, ``the model its
    metadata describes``)."""
    own = tensor_shapes(model.state_dict())
    problems = [
        f"{k} has shape {tuple(shapes[k])} in the file but {own[k]} in the model"
        for k in own
        if k in shapes and tuple(shapes[k]) != own[k]
    ]
    problems += [f"{k} is missing from the file" for k in own if k not in shapes]
    problems += [
        f"the file holds {k}, which the model has no place for" for k in shapes if k not in own
    ]
    if problems:
        more = f" (and {len(problems) - 1} more tensors differ)" if len(problems) > 1 else ""
        summary = ""
        if isinstance(model, CaiT):  # the architectures side by side, as load_pretrained does
            file_shapes = {k: tuple(v) for k, v in shapes.items()}
            summary = (
                f"; model: {_describe_model(model)}; checkpoint: {_describe_shapes(file_shapes)}"
            )
        raise ValueError(f"{source} does not match {what}{summary}; {problems[0]}{more}")


def describe_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """A one-line summary of the architecture a state dict was saved from."""
    return _describe_shapes(tensor_shapes(state_dict))


def _describe_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    parts = []
    patch = shapes.get("patch_embed.proj.weight")
    if patch:
        parts += [f"embed_dim={patch[0]}", f"patch_size={patch[-1]}"]
    sa = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    ca = {k.split(".")[1] for k in shapes if k.startswith("blocks_token_only.")}
    parts += [f"depth={len(sa)}", f"ca_depth={len(ca)}"]
    if "pos_embed" in shapes:
        parts.append(f"pos_embed={tuple(shapes['pos_embed'])}")
    if shapes.get("head.weight"):
        parts.append(f"num_classes={shapes['head.weight'][0]}")
    return ", ".join(parts)


def _describe_model(model: CaiT) -> str:
    c = model.config
    return (
        f"embed_dim={c.embed_dim}, patch_size={c.patch_size}, depth={c.depth}, "
        f"ca_depth={c.ca_depth}, pos_embed={tuple(model.pos_embed.shape)}, "
        f"num_classes={c.num_classes}"
    )


def adapt_state_dict(
    state_dict: dict[str, Tensor], model: CaiT
) -> tuple[dict[str, Tensor], LoadReport]:
    """Resize position embeddings to the model's grid and drop a head of another size.

    Returns the adapted state dict and a report saying what changed. Everything else must
    then match exactly.
    """
    report = LoadReport()
    sd = dict(state_dict)
    if model.dist_token is not None and "dist_token" not in sd and "cls_token" in sd:
        # A checkpoint without a distillation token (every released CaiT): start the token
        # from the class token and its head from the class head.
        sd["dist_token"] = sd["cls_token"].clone()
        report.initialised_dist_token = True
        if model.config.class_token == "early" and "pos_embed" in sd:
            pos = sd["pos_embed"]  # DeiT layout: give the new token a copy of the class slot
            sd["pos_embed"] = torch.cat((pos[:, :1], pos), dim=1)
        logger.info(
            "checkpoint has no distillation token: dist_token initialised from "
            "cls_token and head_dist from head"
        )
    pos = sd.get("pos_embed")
    target = model.pos_embed
    if pos is not None and pos.ndim == 3 and pos.shape[-1] == target.shape[-1]:
        prefix = model.config.num_prefix_tokens
        if pos.shape[1] != target.shape[1]:
            g = model.config.grid_size
            n_old = pos.shape[1] - prefix
            side = int(round(max(n_old, 0) ** 0.5))
            if side * side == n_old and side > 0:
                sd["pos_embed"] = resample_pos_embed(pos, (g, g), prefix, old_grid=(side, side))
                report.resized_pos_embed = (side, g)
                logger.info(
                    "resized pos_embed from a %dx%d to a %dx%d patch grid", side, side, g, g
                )
    head_w = sd.get("head.weight")
    if head_w is not None:
        if model.num_classes == 0:
            for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
                sd.pop(key, None)
            report.reset_head = True
            logger.info(
                "dropped the checkpoint's %d-class head: the model has none", head_w.shape[0]
            )
        elif (
            head_w.ndim == 2
            and head_w.shape[1] == model.num_features
            and head_w.shape[0] != model.num_classes
        ):
            sd.pop("head.weight")
            sd.pop("head.bias", None)
            model.reset_classifier(model.num_classes)
            sd["head.weight"], sd["head.bias"] = model.head.weight.data, model.head.bias.data
            if model.config.distilled:
                sd["head_dist.weight"] = model.head_dist.weight.data
                sd["head_dist.bias"] = model.head_dist.bias.data
            report.reset_head = True
            logger.info(
                "checkpoint head has %d classes, model has %d: head re-initialised",
                head_w.shape[0],
                model.num_classes,
            )
    if report.initialised_dist_token and "head.weight" in sd and "head_dist.weight" not in sd:
        sd["head_dist.weight"] = sd["head.weight"].clone()
        if "head.bias" in sd:
            sd["head_dist.bias"] = sd["head.bias"].clone()
    return sd, report


def load_pretrained(
    model: CaiT,
    source: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
) -> LoadReport:
    """Load weights into ``model`` from a path, URL, Hub id or an in-memory state dict.

    Position embeddings are resized when the checkpoint's grid differs, and a head with
    another number of classes is re-initialised (both logged). Any other difference raises
    a one-line ``ValueError`` (:func:`check_tensors_fit`) naming a missing, unexpected or
    mis-shaped tensor; with ``strict=False`` the differences are logged and the matching
    tensors are still loaded.
    """
    if isinstance(source, Mapping):
        state_dict = unwrap_state_dict(source)
        name = "state dict"
    else:
        state_dict = read_state_dict(source)
        name = str(source)
    sd, report = adapt_state_dict(state_dict, model)
    if strict:
        check_tensors_fit(model, tensor_shapes(sd), f"checkpoint {name}", "the model")
        model.load_state_dict(sd, strict=True)
        return report
    own = model.state_dict()
    report.missing = sorted(k for k in own if k not in sd)
    report.unexpected = sorted(k for k in sd if k not in own)
    report.mis_shaped = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    )
    differences = [
        f"{label} keys: {_first_keys(keys)}"
        for label, keys in (
            ("missing", report.missing),
            ("unexpected", report.unexpected),
            ("mis-shaped", report.mis_shaped),
        )
        if keys
    ]
    if differences:
        logger.warning(
            "checkpoint %s does not match the model, only the tensors that fit are loaded; %s",
            name,
            "; ".join(differences),
        )
    loadable = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return report


def _first_keys(keys: list[str], shown: int = 20) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
