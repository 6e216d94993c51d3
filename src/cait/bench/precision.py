"""Agreement of a model with itself in low precision: top-1 in fp32 and in bf16/fp16 on the
same images, and how often the two predict the same class.

Used by the fast-kernel tests (``tests/kernels``) and by ``examples/bench_cpu.sh`` for the
bf16 accuracy of the trained demo model (docs/BENCHMARKS.md). Not imported by
``cait.bench`` itself: :func:`checkpoint_precision_agreement` reads a validation split, and
the data pipeline imports timm, which ``cait bench`` does not need.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cait import runtime
from cait.data import build_val_dataset, eval_transform
from cait.models.build import load_for_inference
from cait.precision import bf16_model, quantize_int8

__all__ = ["checkpoint_precision_agreement", "precision_agreement"]


def precision_agreement(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    dtype: str = "bf16",
    batch_size: int = 256,
    autocast: bool = False,
    calibration: Sequence[Tensor] | None = None,
) -> dict[str, float]:
    """Top-1 of ``model`` in fp32 and in ``dtype`` on the same images, and their agreement.

    The low-precision model is a cast copy; with ``autocast``, the model under autocast, its
    linear layers packed in bf16 on the CPU as ``--precision bf16`` runs it; for ``int8``, a
    quantized copy (:func:`cait.precision.quantize_int8`), its activation scales fixed from
    the ``calibration`` batches when given. ``model`` itself is left unchanged.
    ``agreement`` is the fraction of images whose predicted class is the same in both;
    ``max_abs_prob_diff`` compares the softmax probabilities.
    """
    int8 = dtype == "int8"
    low_dtype = torch.float32 if int8 else runtime.DTYPES[dtype]
    device = next(model.parameters()).device
    if int8:
        low, autocast = quantize_int8(model, calibration), False
    elif autocast:  # what --precision bf16 runs: on the CPU, packed bf16 linear layers
        low = bf16_model(model, device) if dtype == "bf16" else model
    else:
        low = copy.deepcopy(model).to(low_dtype)
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(low_dtype, "none")
    preds, low_preds, diffs = [], [], []
    model.eval()
    low.eval()
    with torch.inference_mode():
        for batch in images.split(batch_size):
            batch = batch.to(device)
            p = model(batch).float().softmax(-1)
            if autocast:
                with runtime.autocast(device, amp):
                    q = low(batch).float().softmax(-1)
            else:
                q = low(batch.to(low_dtype)).float().softmax(-1)
            preds.append(p.argmax(-1).cpu())
            low_preds.append(q.argmax(-1).cpu())
            diffs.append((p - q).abs().max().item())
    pred, low_pred = torch.cat(preds), torch.cat(low_preds)
    return {
        "images": len(pred),
        "top1_fp32": (pred == targets).float().mean().item(),
        f"top1_{dtype}": (low_pred == targets).float().mean().item(),
        "agreement": (pred == low_pred).float().mean().item(),
        "max_abs_prob_diff": max(diffs),
    }


def checkpoint_precision_agreement(
    checkpoint: str,
    data: str = "digits",
    dtype: str = "bf16",
    autocast: bool = False,
    calibration: Sequence[Tensor] | None = None,
) -> dict[str, float]:
    """:func:`precision_agreement` for a checkpoint on its validation split (e.g. the demo
    model on the digits test split), with the checkpoint's eval transform."""

    loaded = load_for_inference(checkpoint)
    dataset = build_val_dataset(data, eval_transform(loaded.settings), loaded.folder_names)
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([s[0] for s in samples])
    targets = torch.tensor([s[1] for s in samples])
    return precision_agreement(
        loaded.model, images, targets, dtype, autocast=autocast, calibration=calibration
    )
