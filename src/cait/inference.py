"""Evaluation and prediction from a checkpoint: ``cait eval`` and ``cait predict``."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from cait import runtime
from cait.data import build_val_dataset, collate_samples, eval_transform, read_image
from cait.models.build import LoadedModel, load_for_inference
from cait.threads import adapt as adapt_threads
from cait.training.engine import evaluate

# LoadedModel and load_for_inference live in cait.models.build; named here too because
# cait.inference exported them before the package layout
__all__ = ["LoadedModel", "evaluate_checkpoint", "load_for_inference", "predict"]

logger = logging.getLogger(__name__)


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
    settings = loaded.settings.replace(crop_pct=crop_pct)
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
        adapt_threads()
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
