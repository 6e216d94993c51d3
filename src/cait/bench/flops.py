"""Model FLOP utilisation for ``cait bench``: the FLOPs of one image, counted once per model,
against the device's peak rate.

The FLOPs are the model's, not the kernels': :class:`torch.utils.flop_counter.FlopCounterMode`
counts the matrix products (linear layers, the patch convolution, attention) of a forward
pass (and, for training, its backward pass) of a copy of the model on the ``meta`` device,
where nothing is computed and the talking-heads attention runs its Python path (standard
ops the counter knows). A kernel that recomputes (the fused Triton backward) or keeps
nothing thus does not change the count: model FLOP utilisation (MFU, as PaLM defines it,
Chowdhery et al. 2022, Appendix B) compares models, not kernels. Elementwise work (softmax,
norms, GELU, the optimiser) is not counted, as is usual for MFU.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_TFLOPS", "flops_per_image", "peak_tflops"]

# Dense peak rates in TFLOP/s (no sparsity) by precision, keyed by a substring of
# torch.cuda.get_device_name(). "fp32" is the non-tensor-core rate (torch's matmuls in fp32
# do not use TF32 by default). Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5; the
# H200 datasheet gives the same rates: 989 TFLOP/s bf16/fp16, 67 fp32), the PCIe card's
# (756, 51), NVIDIA A100 datasheet (312, 19.5), NVIDIA Ada Lovelace architecture whitepaper
# for the RTX 4090 (165.2 with fp32 accumulation, 82.6 fp32). The first matching key wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
}


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak rate for ``dtype`` (bf16/fp16/fp32) from :data:`PEAK_TFLOPS`;
    None for the CPU, an unknown card or precision."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, rates in PEAK_TFLOPS.items():
        if key in name:
            return rates.get(dtype)
    return None


def flops_per_image(model: nn.Module, image_shape: tuple[int, ...], train: bool) -> float:
    """FLOPs of one image through ``model`` (forward; forward and backward when ``train``),
    counted on a ``meta`` copy at batch 2 and halved (a batch of 1 would let a model
    squeeze the batch dimension away)."""
    meta = copy.deepcopy(model).to("meta").train(train).requires_grad_(train)
    dtype = next(meta.parameters()).dtype  # a model cast to bf16/fp16 takes images in it
    images = torch.empty(2, *image_shape, device="meta", dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        out = meta(images)
        logits = out[0] if isinstance(out, tuple) else out
        if train:
            targets = torch.zeros(2, dtype=torch.long, device="meta")
            F.cross_entropy(logits.float(), targets).backward()
    return counter.get_total_flops() / 2
