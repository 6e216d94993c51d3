"""int8 inference on the CPU: the linear layers as oneDNN's int8 matrix products.

Each ``nn.Linear`` (but the talking-heads mixing) becomes an :class:`Int8Linear`:

- the weights in int8, symmetric, one scale per output channel (``[-127, 127]``);
- the input in uint8 with one scale and zero point per tensor: measured on every call
  (*dynamic*), or fixed from a few calibration batches (*static*, :func:`calibrate`);
- the product, the bias and the output's scale in one oneDNN call
  (``torch.ops.onednn.qlinear_pointwise``, what ``torch.compile`` lowers quantized linear
  layers to on x86), the MLP's GELU fused into ``fc1``'s call as a post-op;
- with static activations the MLP's hidden tensor stays uint8 between ``fc1`` and ``fc2``
  (``fc1`` writes it at ``fc2``'s input scale), a quarter of the fp32 tensor's traffic.

Against :func:`torch.ao.quantization.quantize_dynamic` (fbgemm), which this replaced as the
int8 engine, the GELU pass and the ``int_repr`` copy of every input are gone (docs/DEPLOY.md
has the figures and the command). The attention's softmax and mixing, LayerNorm and the
patch embedding stay in fp32; its products take ``q, k, v`` in the dtype ``qkv`` writes
(:func:`quantize_linear_layers`: bf16 where the CPU has it).

oneDNN multiplies uint8 by int8 exactly in int32 only with the VNNI instructions
(:data:`VNNI_FLAGS`); without them it uses ``vpmaddubsw``, whose int16 sums can saturate, so
:func:`supported` asks for them (``cait.precision`` falls back to torch.ao there, logged).

Built on torch's quantized tensor type (``torch.quantize_per_tensor``), which torch 2.10+
flags as deprecated in favour of torchao (pytorch#184982); its warning is silenced here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cait.models.layers import Mlp, TalkingHeadAttention
from cait.precision.swap import KEEP_FLOAT, replace_linear_layers

__all__ = [
    "KEEP_FLOAT",
    "VNNI_FLAGS",
    "Int8Linear",
    "activation_qparams",
    "calibrate",
    "quantize_linear_layers",
    "supported",
]

logger = logging.getLogger(__name__)

# CPU instructions (Linux /proc/cpuinfo names) that multiply uint8 by int8 into int32 without
# intermediate int16 saturation: AVX-512 VNNI, AVX-VNNI, and AMX's int8 tiles.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Symmetric int8 weights use [-127, 127]: -128 has no positive twin.
WEIGHT_QMAX = 127
UINT8_MAX = 255


def supported(flags: set[str]) -> bool:
    """Whether this torch build and a CPU with ``flags`` run :class:`Int8Linear` exactly."""
    return torch.backends.mkldnn.is_available() and bool(flags.intersection(VNNI_FLAGS))


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of uint8 covering ``[low, high]`` and 0 (asymmetric, the zero
    point exact, so that zero padding and ReLU-like zeros stay exact)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / UINT8_MAX, torch.finfo(torch.float32).tiny)
    zero_point = min(UINT8_MAX, max(0, round(-low / scale)))
    return scale, zero_point


@contextmanager
def _quantized_tensors_allowed() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.quantize_per_", UserWarning)
        yield


class Int8Linear(nn.Module):
    """``linear`` in int8 (see the module docstring), ``(..., C_in) -> (..., C_out)`` in fp32,
    or in uint8 at :attr:`output_qparams` when those are set (the next layer's input).

    ``post_op`` is ``"none"`` or ``"gelu"`` (exact, erf-based: ``nn.GELU()``), applied to the
    output in the same call. A uint8 input is taken as already quantized at
    :attr:`input_qparams`; any other is quantized, at :attr:`input_qparams` when they are
    set (static), else at its own range (dynamic).
    """

    def __init__(self, linear: nn.Linear, post_op: str = "none") -> None:
        super().__init__()
        if post_op not in ("none", "gelu"):
            raise ValueError(f"post_op must be 'none' or 'gelu', got {post_op!r}")
        weight = linear.weight.detach().float()  # (C_out, C_in)
        scale = (weight.abs().amax(dim=1) / WEIGHT_QMAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(weight / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.post_op = post_op
        # oneDNN's packed layout is an opaque tensor: kept as plain attributes, not buffers
        # (a quantized copy is built from a checkpoint each time, never saved)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.weight_scale = scale
        self.weight_zero_point = torch.zeros(scale.shape, dtype=torch.int64)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.input_qparams: tuple[float, int] | None = None
        self.output_qparams: tuple[float, int] | None = None
        self.output_dtype = torch.float32  # when not uint8: fp32, or bf16 for the attention
        self.observed: tuple[float, float] | None = None  # input range seen while calibrating
        self.observing = False

    def extra_repr(self) -> str:
        mode = "static" if self.input_qparams is not None else "dynamic"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"post_op={self.post_op}, activations={mode}"
        )

    def _quantize(self, x: Tensor) -> tuple[Tensor, float, int]:
        """``x`` as a uint8 tensor with its scale and zero point."""
        if x.dtype == torch.uint8:
            if self.input_qparams is None:
                raise ValueError("a uint8 input needs input_qparams (set by calibrate)")
            return x, *self.input_qparams
        x = x.float()
        if self.observing or self.input_qparams is None:
            low, high = (float(v) for v in torch.aminmax(x))
            if self.observing:
                seen = self.observed or (low, high)
                self.observed = (min(seen[0], low), max(seen[1], high))
            qparams = self.input_qparams or activation_qparams(low, high)
        else:
            qparams = self.input_qparams
        with _quantized_tensors_allowed():
            q = torch.quantize_per_tensor(x, qparams[0], qparams[1], torch.quint8)
        return q.view(torch.uint8), *qparams  # the same bytes, no int_repr copy

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        q, scale, zero_point = self._quantize(x.reshape(-1, self.in_features))
        out_scale, out_zero_point = self.output_qparams or (1.0, 0)
        y = torch.ops.onednn.qlinear_pointwise(
            q,
            scale,
            zero_point,
            self.packed,
            self.weight_scale,
            self.weight_zero_point,
            self.bias,
            out_scale,
            out_zero_point,
            None if self.output_qparams else self.output_dtype,  # None: uint8 out
            self.post_op,
            [None],
            "none" if self.post_op == "gelu" else "",  # "none": erf GELU, not tanh
        )
        return y.reshape(*lead, self.out_features)


def quantize_linear_layers(model: nn.Module, attention_dtype: torch.dtype = torch.float32) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` (an fp32 model in eval mode) but
    the talking-heads mixing by an :class:`Int8Linear`, the GELU of each :class:`Mlp` fused
    into its ``fc1``; returns how many were replaced. Activations start dynamic. The
    self-attention's ``qkv`` layers write ``attention_dtype`` (bf16: the attention's
    products then run in bf16, as ``--precision bf16`` runs them; the softmax and the
    mixing stay fp32 in the talking-heads kernel)."""
    count = replace_linear_layers(model, Int8Linear)
    for module in model.modules():
        if isinstance(module, TalkingHeadAttention) and isinstance(module.qkv, Int8Linear):
            module.qkv.output_dtype = attention_dtype
    return count


@torch.inference_mode()
def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Fix the input scale of every :class:`Int8Linear` of ``model`` from the ranges its
    inputs take over ``batches`` (images as the model takes them), and chain each MLP's
    hidden tensor in uint8. Returns the number of images seen; none is a ``ValueError``."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for layer in layers:
        layer.input_qparams, layer.output_qparams, layer.observed = None, None, None
        layer.observing = True
    images = 0
    try:
        for batch in batches:
            model(batch)
            images += len(batch)
    finally:
        for layer in layers:
            layer.observing = False
    if images == 0:
        raise ValueError("calibration needs at least one image, got none")
    for layer in layers:
        if layer.observed is not None:  # a layer no image reached stays dynamic
            layer.input_qparams = activation_qparams(*layer.observed)
    for module in model.modules():
        if isinstance(module, Mlp) and isinstance(module.fc1, Int8Linear):
            if isinstance(module.fc2, Int8Linear) and module.fc2.input_qparams is not None:
                module.fc1.output_qparams = module.fc2.input_qparams
    logger.info("int8: activation scales calibrated on %d images", images)
    return images
