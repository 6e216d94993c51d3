"""Inference precisions: fp32, bf16 (autocast) and int8 (dynamically quantized linear layers),
checked against the device and the CPU before a model runs in them.

- ``bf16``: the model keeps its fp32 weights and runs under :func:`torch.autocast`; matrix
  products run in bf16, and the talking-heads kernel mixes heads and takes the softmax in
  fp32 on bf16 inputs (``cait/kernels/csrc/talking_heads.cpp``). On a CPU it needs the
  ``avx512_bf16`` or ``amx_bf16`` instructions (``lscpu`` flags): without them bf16 is
  emulated and slower than fp32, so it is refused rather than run slowly.
- ``int8``: a quantized copy of the model (the caller's model is left as it is) in which
  every ``nn.Linear`` but the talking-heads mixing (``proj_l``, ``proj_w``: ``H x H``
  weights applied to attention logits and probabilities) becomes
  :class:`torch.ao.nn.quantized.dynamic.Linear`: int8 weights with one scale per output
  channel, activations quantized per batch as they come, the result in fp32. The attention
  (logits, softmax, mixing), LayerNorm, GELU and the patch embedding stay in fp32. CPU only
  (torch's quantized kernels, fbgemm/oneDNN, have no CUDA version).

A checkpoint file is never changed: both are applied to the loaded model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from cait import runtime

__all__ = [
    "PRECISIONS",
    "BF16_CPU_FLAGS",
    "Precision",
    "PreparedModel",
    "check_precision",
    "cpu_flags",
    "prepare_model",
    "quantize_int8",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# CPU instructions that run bf16 products natively (Linux /proc/cpuinfo names, as `lscpu`
# shows them); without one of them oneDNN emulates bf16 in fp32, slower than fp32 itself.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The talking-heads mixing layers: (H, H) weights over attention logits and probabilities,
# applied through their .weight by the attention kernels; kept in floating point.
KEEP_FLOAT = ("proj_l", "proj_w")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of this machine's CPU (empty where ``cpuinfo`` is absent)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def check_precision(precision: str, device: torch.device) -> None:
    """Raise a one-line ``ValueError`` for a precision this device cannot run well."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"precision int8 runs on the CPU only (torch's quantized kernels), not on "
            f"{device.type}: use bf16 there"
        )
    if precision == "bf16" and device.type == "cpu":
        flags = cpu_flags()
        if not flags.intersection(BF16_CPU_FLAGS):
            raise ValueError(
                "precision bf16 needs a CPU with "
                f"{' or '.join(BF16_CPU_FLAGS)} (see `lscpu`); this one has neither, where "
                "bf16 is emulated and slower than fp32: use fp32 or int8"
            )


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers (but the talking-heads mixing) are dynamically
    quantized to int8 with per-channel weights (see the module docstring)."""
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in KEEP_FLOAT
    }
    with warnings.catch_warnings():
        # torch 2.10+ flags its quantized tensor types as deprecated (pytorch#184982) in
        # favour of torchao; they are what its int8 CPU kernels run today
        warnings.filterwarnings("ignore", "torch.quantize_per_", UserWarning)
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        quantized = quantize_dynamic(copy.deepcopy(model).float().eval(), spec, dtype=torch.qint8)
    count = sum(isinstance(m, quantized_dynamic.Linear) for m in quantized.modules())
    logger.info("int8: %d linear layers quantized (per-channel weights, dynamic inputs)", count)
    return quantized


@dataclass
class PreparedModel:
    """A model ready to run in ``precision``: call it inside ``autocast()``."""

    model: nn.Module
    precision: str
    autocast: Callable[[], AbstractContextManager[object]]


def prepare_model(model: nn.Module, precision: str, device: torch.device) -> PreparedModel:
    """``model`` (on ``device``) made ready to run in ``precision``, after
    :func:`check_precision`; the precision is logged. int8 gives a quantized copy; fp32
    and bf16 give ``model`` itself."""
    check_precision(precision, device)
    if precision == "int8":
        prepared = PreparedModel(quantize_int8(model.cpu()), precision, contextlib.nullcontext)
    else:
        amp = "bf16" if precision == "bf16" else "none"
        prepared = PreparedModel(model.to(device), precision, lambda: runtime.autocast(device, amp))
    how = {"fp32": "fp32", "bf16": "bf16 autocast", "int8": "int8 dynamic quantization"}
    logger.info("precision: %s on %s", how[precision], device)
    return prepared
