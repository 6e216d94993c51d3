"""bf16 inference on the CPU: the linear layers' weights packed once in bf16 for oneDNN.

Under ``torch.autocast`` an ``nn.Linear`` casts its fp32 weight to bf16 on every call (the
cast is cached only for weights that need gradients), and its GELU is a pass of its own
over the MLP's hidden tensor. :class:`Bf16Linear` holds the weight already in bf16, in
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), and runs the product,
the bias and the MLP's GELU in one call (``torch.ops.mkldnn._linear_pointwise``: what
``torch.compile`` lowers a frozen linear layer to on x86). It takes any input dtype and
writes bf16, as a linear layer under autocast does; the rest of the model still runs under
autocast (``cait.precision``), so the numbers are autocast's but for the GELU, taken on the
fp32 accumulator before the one rounding to bf16. docs/DEPLOY.md has the speed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cait.precision.swap import replace_linear_layers

__all__ = ["Bf16Linear", "pack_linear_layers", "supported"]


def supported() -> bool:
    """Whether this torch build has oneDNN's CPU linear kernels."""
    return torch.backends.mkldnn.is_available()


class Bf16Linear(nn.Module):
    """``linear`` with its weight and bias in bf16, packed for oneDNN, ``(..., C_in) ->
    (..., C_out)`` in bf16; ``post_op`` is ``"none"`` or ``"gelu"`` (exact, erf-based)."""

    def __init__(self, linear: nn.Linear, post_op: str = "none") -> None:
        super().__init__()
        if post_op not in ("none", "gelu"):
            raise ValueError(f"post_op must be 'none' or 'gelu', got {post_op!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.post_op = post_op
        weight = linear.weight.detach().to(torch.bfloat16)  # (C_out, C_in)
        # an opaque oneDNN tensor: a plain attribute, not a buffer (the copy is never saved)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, post_op={self.post_op}"

    def forward(self, x: Tensor) -> Tensor:
        algorithm = "none" if self.post_op == "gelu" else None  # "none": erf GELU, not tanh
        return torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), self.packed, self.bias, self.post_op, [], algorithm
        )


def pack_linear_layers(model: nn.Module) -> int:
    """Replace, in place, the linear layers of ``model`` (on the CPU) but the talking-heads
    mixing by :class:`Bf16Linear`, each MLP's GELU fused into its ``fc1``; returns how many
    (:func:`cait.precision.swap.replace_linear_layers`)."""
    return replace_linear_layers(model, Bf16Linear)
