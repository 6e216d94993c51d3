"""Swapping a model's linear layers for low-precision ones (the int8 and bf16 engines): which
layers, and the MLP's GELU fused into the layer before it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cait.models.layers import Mlp

__all__ = ["KEEP_FLOAT", "replace_linear_layers"]

# The talking-heads mixing layers: (H, H) weights over attention logits and probabilities,
# applied through their .weight by the attention kernels; kept in floating point.
KEEP_FLOAT = ("proj_l", "proj_w")


def replace_linear_layers(model: nn.Module, build: Callable[[nn.Linear, str], nn.Module]) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` but the talking-heads mixing by
    ``build(linear, post_op)``; the exact GELU of each :class:`Mlp` is fused into its
    ``fc1`` (``post_op="gelu"``, the ``act`` made an identity), every other layer gets
    ``"none"``. Returns how many layers were replaced."""
    count = 0
    for module in list(model.modules()):
        exact_gelu = isinstance(module, Mlp) and type(module.act) is nn.GELU
        if exact_gelu and module.act.approximate == "none" and type(module.fc1) is nn.Linear:
            module.fc1 = build(module.fc1, "gelu")
            module.act = nn.Identity()
            count += 1
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name not in KEEP_FLOAT:
                setattr(module, name, build(child, "none"))
                count += 1
    return count
