"""Evaluation and prediction from a checkpoint: ``cait eval`` and ``cait predict``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

from cait import runtime
from cait.data import (
    DataSettings,
    build_val_dataset,
    collate_samples,
    eval_transform,
    read_image,
)
from cait.engine import evaluate
from cait.factory import model_from_spec
from cait.model import CaiT
from cait.variants import create_model, get_variant
from cait.weights import load_file_safely, load_pretrained, read_state_dict

__all__ = ["LoadedModel", "evaluate_checkpoint", "load_for_inference", "predict"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in eval mode with its eval settings.

    ``class_names`` are for display; ``folder_names`` are the class folder names the model's
    indices correspond to (the same for our checkpoints; WordNet synsets such as
    ``n01440764`` for ImageNet weights, whose display names are the synset lemmas).
    """

    model: nn.Module
    settings: DataSettings
    class_names: list[str] | None
    folder_names: list[str] | None


def _imagenet_names() -> tuple[list[str], list[str]]:
    """ImageNet-1k synsets (sorted, the index order of the released weights) and names."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return list(info.label_names()), list(info.label_descriptions())


def load_for_inference(checkpoint: str, model_name: str | None = None) -> LoadedModel:
    """A model ready for evaluation, with its eval settings and class names.

    Our training checkpoints (``last.pt``/``best.pt``) and ``model.safetensors`` carry their
    config; for official or timm weights, name the variant with ``model_name``.
    """
    path = Path(checkpoint)
    meta = None
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        if "model_config" in raw:
            meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    elif path.is_file():
        obj = load_file_safely(path)
        if isinstance(obj, dict) and "model_config" in obj:
            meta = obj
    if meta is not None:
        # a training checkpoint keeps the name in its config ("model" holds the weights)
        name = meta["config"]["model"] if "config" in meta else meta["model"]
        model = model_from_spec({"model": name, "model_config": meta["model_config"]})
        if isinstance(model, CaiT):
            load_pretrained(model, checkpoint)
        else:
            model.load_state_dict(read_state_dict(checkpoint), strict=True)
        settings = DataSettings(
            **{
                k: (tuple(v) if isinstance(v, list) else v)
                for k, v in meta["data_settings"].items()
            }
        )
        names = folders = list(meta["class_names"])
    else:
        if model_name is None:
            raise ValueError(
                f"{checkpoint} is not a cait training checkpoint; pass --model NAME to say "
                "which variant its weights are for"
            )
        variant = get_variant(model_name)
        state_dict = read_state_dict(checkpoint)
        head = state_dict.get("head.weight")
        num_classes = head.shape[0] if head is not None else variant.config.num_classes
        model = create_model(model_name, num_classes=num_classes)
        load_pretrained(model, state_dict)
        settings = DataSettings(
            variant.img_size, variant.crop_pct, variant.interpolation, variant.mean, variant.std
        )
        folders, names = _imagenet_names() if num_classes == 1000 else (None, None)
    return LoadedModel(model.eval(), settings, names, folders)


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    model_name: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    amp: str = "none",
    crop_pct: float | None = None,
) -> dict:
    """Top-1, top-5, loss and image count on the validation split (fp32 by default)."""
    dev = runtime.inference_device(device, amp)
    loaded = load_for_inference(checkpoint, model_name)
    settings = loaded.settings
    if crop_pct is not None:
        settings = DataSettings(
            settings.img_size, crop_pct, settings.interpolation, settings.mean, settings.std
        )
    dataset = build_val_dataset(data, eval_transform(settings), loaded.folder_names)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=dev.type == "cuda",
    )
    result = evaluate(loaded.model.to(dev), loader, dev, amp, progress=True)
    if result["skipped"]:
        logger.warning(
            "skipped %d unreadable file(s):\n  %s",
            len(result["skipped"]),
            "\n  ".join(result["skipped"]),
        )
    return result


@torch.no_grad()
def predict(
    checkpoint: str,
    images: list[str],
    topk: int = 5,
    model_name: str | None = None,
    device: str = "auto",
) -> list[dict]:
    """Top-k classes with names and probabilities for each image file."""
    dev = runtime.inference_device(device, "none")
    loaded = load_for_inference(checkpoint, model_name)
    model = loaded.model.to(dev)
    transform = eval_transform(loaded.settings)
    results = []
    for image in images:
        img = read_image(image)
        probs = model(transform(img)[None].to(dev)).float().softmax(-1)[0]
        k = min(topk, probs.numel())
        values, indices = probs.topk(k)
        results.append(
            {
                "image": str(image),
                "predictions": [
                    {
                        "class": int(i),
                        "name": loaded.class_names[i] if loaded.class_names else str(int(i)),
                        "probability": float(p),
                    }
                    for p, i in zip(values.tolist(), indices.tolist(), strict=True)
                ],
            }
        )
    return results
