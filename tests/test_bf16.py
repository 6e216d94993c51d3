"""The bf16 engine (cait.precision.bf16): each packed layer against the formula (weights,
inputs and bias rounded to bf16, products summed in fp32, one rounding), the layers it
replaces, and a packed model against autocast over the fp32 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from torch import nn

from cait.models.layers import Mlp
from cait.models.registry import create_model
from cait.precision import pack_bf16
from cait.precision.bf16 import Bf16Linear, supported
from cait.precision.swap import KEEP_FLOAT

pytestmark = pytest.mark.skipif(not supported(), reason="torch without oneDNN (mkldnn)")


def _round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("post_op", ["none", "gelu"])
def test_a_packed_layer_is_the_bf16_formula(post_op):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    x = torch.randn(3, 9, 48)
    layer = Bf16Linear(linear, post_op)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(_round(x), _round(linear.weight), _round(linear.bias))
    if post_op == "gelu":
        want = F.gelu(want)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 9, 80)
    # one rounding to bf16 (2**-8 relative), and oneDNN's own summation order
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2**-7)
    # a wrong GELU (tanh) or a missing bias would be further off than that
    assert (got.float() - F.linear(_round(x), _round(linear.weight))).abs().max() > 0.1
    with pytest.raises(ValueError):
        Bf16Linear(linear, "relu")


def test_a_packed_model_keeps_the_mixing_and_agrees_with_autocast():
    model = randomize_(create_model("cait_digits_16", depth=2), seed=1).eval()
    packed = pack_bf16(model)
    kinds = dict(packed.named_modules())
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            kept = name.rpartition(".")[2] in KEEP_FLOAT
            assert isinstance(kinds[name], nn.Linear if kept else Bf16Linear), name
    mlps = [m for m in packed.modules() if isinstance(m, Mlp)]
    assert mlps and all(m.fc1.post_op == "gelu" and isinstance(m.act, nn.Identity) for m in mlps)
    assert all(type(m) is not Bf16Linear for m in model.modules())  # the model is untouched
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        want, got = model(x).float(), packed(x).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
