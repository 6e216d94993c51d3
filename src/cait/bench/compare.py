"""What ``cait bench --compare`` times beside ours: timm's model of the same name, given our
weights and checked in fp32 to compute the same logits before anything is timed.

Every use of timm in :mod:`cait.bench` goes through :func:`build_reference`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

from cait.models.timm_interop import timm_model

__all__ = [
    "CHECK_IMAGES",
    "CHECK_LAYERSCALE",
    "COMPARE_WITH",
    "FP32_TOLERANCE",
    "Compare",
    "build_reference",
    "check_agreement",
    "class_logits",
    "set_layerscale",
]

# What `cait bench --compare` can time beside ours: timm's model of the same name.
Compare = Literal["timm"]
COMPARE_WITH: tuple[str, ...] = get_args(Compare)
# LayerScale factor used for the output check: the released init (1e-5) would make every
# residual branch invisible in the logits, so that any two models would "agree".
CHECK_LAYERSCALE = 0.1
# Outputs of the two fp32 models must agree to this, relative to the largest logit, on the
# first CHECK_IMAGES images of the batch (on the benchmark's device, before timing).
FP32_TOLERANCE = 1e-4
CHECK_IMAGES = 16


def set_layerscale(model: nn.Module, value: float) -> None:
    """Fill every LayerScale factor (``gamma_1``, ``gamma_2``) of ``model`` with ``value``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(value)


def class_logits(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The class logits of a model's output (the first of a distillation model's pair)."""
    return out[0] if isinstance(out, tuple) else out


def build_reference(name: str, state_dict: dict[str, Tensor]) -> nn.Module:
    """timm's model of the same name, with our weights."""
    try:
        ref = timm_model(name)
    except ValueError as err:
        raise ValueError(f"timm has no model named {name!r} to compare with") from err
    ref.load_state_dict(state_dict, strict=True)
    return ref


def check_agreement(ours: nn.Module, ref: nn.Module, images: Tensor) -> tuple[float, float]:
    """Max |logit difference| and top-1 agreement of two models on the same batch (eval);
    ``RuntimeError`` when the difference exceeds :data:`FP32_TOLERANCE`."""
    with torch.inference_mode():
        a = class_logits(ours.eval()(images)).float()
        b = class_logits(ref.eval()(images)).float()
    diff = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    if diff > FP32_TOLERANCE * max(b.abs().max().item(), 1.0):
        raise RuntimeError(
            f"outputs of cait and timm disagree: max abs difference {diff:.3g} "
            f"(tolerance {FP32_TOLERANCE:g} relative to the largest logit)"
        )
    return diff, agree
