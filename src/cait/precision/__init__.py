"""Inference precisions: fp32, bf16 (autocast) and int8 (quantized linear layers), checked
against the device and the CPU before a model runs in them.

- ``bf16``: the model runs under :func:`torch.autocast`; matrix products run in bf16, and
  the talking-heads kernel mixes heads and takes the softmax in fp32 on bf16 inputs
  (``cait/kernels/csrc/talking_heads.cpp``). On a CPU it runs a copy whose linear layers
  hold their weights packed in bf16, the MLP's GELU fused (:mod:`cait.precision.bf16`:
  autocast would cast every weight on every call); on CUDA the model itself. On a CPU it
  needs the ``avx512_bf16`` or ``amx_bf16`` instructions (``lscpu`` flags): without them
  bf16 is emulated and slower than fp32, so it is refused rather than run slowly.
- ``int8``: a quantized copy of the model (the caller's model is left as it is) in which
  every ``nn.Linear`` but the talking-heads mixing (``proj_l``, ``proj_w``: ``H x H``
  weights applied to attention logits and probabilities) runs in int8 with one weight
  scale per output channel. On a CPU with VNNI (``avx512_vnni``, ``avx_vnni`` or
  ``amx_int8``) they are oneDNN's int8 products with the MLP's GELU fused
  (:mod:`cait.precision.int8`), their activations quantized per batch as they come or, given
  calibration images, at scales fixed from those; elsewhere (logged) torch.ao's dynamic
  quantization (:func:`quantize_int8_ao`). With oneDNN's engine on a CPU that also has
  the bf16 flags, the attention's products take bf16 ``q, k, v`` (as ``bf16`` runs them);
  the softmax, the talking-heads mixing, LayerNorm and the patch embedding stay in fp32.
  CPU only (neither engine has a CUDA version).

A checkpoint file is never changed: both are applied to the loaded model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from cait import runtime
from cait.precision import bf16 as bf16_engine
from cait.precision import int8
from cait.precision.swap import KEEP_FLOAT

__all__ = [
    "PRECISIONS",
    "BF16_CPU_FLAGS",
    "Precision",
    "PreparedModel",
    "check_precision",
    "cpu_flags",
    "prepare_model",
    "quantize_int8",
    "quantize_int8_ao",
    "bf16_model",
    "pack_bf16",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# CPU instructions that run bf16 products natively (Linux /proc/cpuinfo names, as `lscpu`
# shows them); without one of them oneDNN emulates bf16 in fp32, slower than fp32 itself.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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


def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` whose linear layers (but the talking-heads mixing) run in int8
    (see the module docstring): oneDNN's where the CPU has VNNI, torch.ao's elsewhere
    (logged). ``calibration`` (batches of images as the model takes them) fixes the
    activation scales; without it they are measured on every batch."""
    flags = cpu_flags()
    if not int8.supported(flags):
        logger.warning(
            "int8: this CPU has none of %s (see `lscpu`), or torch has no oneDNN: torch.ao's "
            "dynamic quantization instead, slower%s",
            ", ".join(int8.VNNI_FLAGS),
            "; the calibration images are not used" if calibration is not None else "",
        )
        return quantize_int8_ao(model)
    quantized = copy.deepcopy(model).cpu().float().eval()
    bf16 = bool(flags.intersection(BF16_CPU_FLAGS))
    attention = torch.bfloat16 if bf16 else torch.float32
    count = int8.quantize_linear_layers(quantized, attention)
    logger.info(
        "int8: %d linear layers in oneDNN int8 (per-channel weights), the attention in %s",
        count,
        "bf16 (the CPU has it)" if bf16 else "fp32",
    )
    if calibration is not None:
        int8.calibrate(quantized, calibration)
    return quantized


def quantize_int8_ao(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers (but the talking-heads mixing) are
    torch.ao's dynamically quantized ``Linear`` (fbgemm or oneDNN kernels, per-channel
    weights, activations quantized per batch, outputs in fp32): the int8 engine of CPUs
    without VNNI."""
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
        quantized = quantize_dynamic(
            copy.deepcopy(model).cpu().float().eval(), spec, dtype=torch.qint8
        )
    count = sum(isinstance(m, quantized_dynamic.Linear) for m in quantized.modules())
    logger.info("int8: %d linear layers quantized (torch.ao, dynamic inputs)", count)
    return quantized


def bf16_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model that runs under bf16 autocast on ``device``: on the CPU a packed copy
    (:func:`pack_bf16`), on CUDA ``model`` itself."""
    return pack_bf16(model) if device.type == "cpu" else model


def pack_bf16(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose linear layers (but the talking-heads mixing) hold their
    weights in bf16, packed for oneDNN, the MLP's GELU fused (:mod:`cait.precision.bf16`); it
    runs under bf16 autocast like the model itself. ``model`` is returned as it is where
    torch has no oneDNN."""
    if not bf16_engine.supported():
        return model
    packed = copy.deepcopy(model).cpu().float().eval()
    count = bf16_engine.pack_linear_layers(packed)
    logger.info("bf16: %d linear layers packed in bf16 for oneDNN (GELU fused)", count)
    return packed


@dataclass
class PreparedModel:
    """A model ready to run in ``precision``: call it inside ``autocast()``."""

    model: nn.Module
    precision: str
    autocast: Callable[[], AbstractContextManager[object]]


def prepare_model(
    model: nn.Module,
    precision: str,
    device: torch.device,
    calibration: Iterable[torch.Tensor] | None = None,
) -> PreparedModel:
    """``model`` (on ``device``) made ready to run in ``precision``, after
    :func:`check_precision`; the precision is logged. int8 gives a quantized copy on the
    CPU, its activation scales fixed from ``calibration`` when given (:func:`quantize_int8`;
    the batches are read only then); bf16 on the CPU a packed copy (:func:`pack_bf16`);
    fp32, and bf16 on CUDA, ``model`` itself. ``model`` is left as it is (but moved to
    ``device`` where it is returned); ``calibration`` with another precision is refused."""
    check_precision(precision, device)
    if calibration is not None and precision != "int8":
        raise ValueError(f"calibration is for precision int8, not {precision}")
    if precision == "int8":
        quantized = quantize_int8(model, calibration)
        prepared = PreparedModel(quantized, precision, contextlib.nullcontext)
    else:
        amp = "bf16" if precision == "bf16" else "none"
        if precision == "bf16":
            model = bf16_model(model, device)
        prepared = PreparedModel(model.to(device), precision, lambda: runtime.autocast(device, amp))
    how = {"fp32": "fp32", "bf16": "bf16 autocast", "int8": "int8 dynamic quantization"}
    if any(getattr(m, "input_qparams", None) is not None for m in prepared.model.modules()):
        how["int8"] = "int8 static quantization (calibrated)"
    logger.info("precision: %s on %s", how[precision], device)
    return prepared
