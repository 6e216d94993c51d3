"""The fused Triton kernels (``cait::talking_heads_fused``) against the plain computation.

On the CPU, Triton's interpreter runs them at small shapes in a process of its own
(:mod:`triton_interpreter_check`, ``TRITON_INTERPRET=1``): forward and every gradient in fp32
within 1e-4 of the float64 reference, relative to each tensor's largest value. On CUDA
(marker ``gpu``): every released shape against the plain path in fp32 and bf16, the op's
registration (``opcheck``), and the model compiled with no graph break, in CUDA graphs too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_CUDA, randomize_

import cait
from cait.kernels import ops, talking_heads, triton_talking_heads
from cait.models.layers import TalkingHeadAttention

CHECK = Path(__file__).with_name("triton_interpreter_check.py")
SRC = Path(cait.__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(not triton_talking_heads.AVAILABLE, reason="no Triton")


@needs_triton
def test_fused_kernels_equal_the_reference_in_the_interpreter():
    """(B, N, H, hd): 3 heads padded to 4, 20 tokens in one tile of 32, 8 channels padded
    to 16; then 33 tokens over two key tiles and a partial third; 8 heads (tiles of 16,
    more warps); then fp16 (products of fp16 tiles accumulated in fp32). Bounded: a few
    seconds of CPU beside the process start."""
    shapes = ["2,20,3,8", "1,33,4,16", "1,17,8,8", "2,20,3,16,fp16"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    run = subprocess.run(
        [sys.executable, str(CHECK), *shapes],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("|error|") == 6 * len(shapes), run.stdout


def test_a_shape_the_kernels_do_not_take_is_logged_once(caplog):
    talking_heads._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="cait.kernels.talking_heads"):
        assert not talking_heads._fused_supported(17, 48, torch.float32)
        assert not talking_heads._fused_supported(17, 48, torch.float32)
        assert not talking_heads._fused_supported(4, 48, torch.float64)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "17 heads of 48 channels" in lines[0], lines
    assert talking_heads._fused_supported(4, 48, torch.bfloat16) is True


# The released shapes: (heads, head dim, tokens): XXS/XS/S/M at 224 (196 patches), 384 (576)
# and M48 at 448 (784), plus the small models' 3 heads of 64 channels.
RELEASED = [(4, 48, 196), (6, 48, 576), (8, 48, 196), (16, 48, 784), (3, 64, 16)]
CUDA = torch.device("cuda")


def _layer_pair(heads: int, hd: int) -> tuple[TalkingHeadAttention, TalkingHeadAttention]:
    plain = randomize_(TalkingHeadAttention(heads * hd, heads, impl="plain"))
    with torch.no_grad():
        plain.proj_l.bias.normal_(0, 1.0)
        plain.proj_w.bias.normal_(0, 0.5)
    fused = TalkingHeadAttention(heads * hd, heads)
    fused.load_state_dict(plain.state_dict())
    return plain.to(CUDA), fused.to(CUDA)


def _out_and_grads(layer, x, g_out, dtype):
    x = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = layer(x)[0]
    params = [x, layer.qkv.weight, layer.proj_l.weight, layer.proj_w.weight, layer.proj_w.bias]
    return [out.float(), *torch.autograd.grad(out, params, g_out.to(out.dtype))]


@pytest.mark.parametrize("heads, hd, tokens", RELEASED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.gpu
@NEEDS_CUDA
def test_fused_equals_plain_on_cuda(heads, hd, tokens, dtype, monkeypatch):
    """The default CUDA path is the fused op; fp32 within 1e-4 of plain's values relative to
    each tensor's largest; bf16 no further from plain fp32 than plain bf16 is (plus 1%)."""
    calls = []
    fused_op = ops.talking_heads_fused
    monkeypatch.setattr(ops, "talking_heads_fused", lambda *a: calls.append(1) or fused_op(*a))
    plain, fused = _layer_pair(heads, hd)
    x = torch.randn(2, tokens, heads * hd, device=CUDA)
    g_out = torch.randn(2, tokens, heads * hd, device=CUDA)
    ref = _out_and_grads(plain, x, g_out, torch.float32)
    got = _out_and_grads(fused, x, g_out, dtype)
    assert calls, "the fused op did not run"
    plain_low = _out_and_grads(plain, x, g_out, dtype) if dtype != torch.float32 else None
    for i, (r, f) in enumerate(zip(ref, got, strict=True)):
        size = r.abs().max()
        error = (f.float() - r).abs().max() / size
        if plain_low is None:
            assert error <= 1e-4, (i, error.item())
        else:
            bound = (plain_low[i].float() - r).abs().max() / size
            assert error <= bound + 1e-2, (i, error.item(), bound.item())


@pytest.mark.gpu
@NEEDS_CUDA
def test_fused_op_passes_opcheck_on_cuda():
    g = torch.Generator().manual_seed(0)
    H, hd = 4, 48
    args = [torch.randn(2, 197, 3 * H * hd, generator=g)]
    args += [torch.randn(*s, generator=g) for s in [(H, H), (H,), (H, H), (H,)]]
    args = [a.to(CUDA).requires_grad_() for a in args]
    torch.library.opcheck(ops.talking_heads_fused, (*args, H))


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compiled_model_keeps_the_fused_op_on_cuda(mode):
    """No graph break with the fused op in the graph; compiled logits and gradients equal
    eager's (CUDA graphs included)."""
    torch._dynamo.reset()
    model = randomize_(cait.create_model("cait_xxs24_224", depth=2)).to(CUDA)
    x = torch.randn(4, 3, 224, 224, device=CUDA)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    nodes = [str(n.target) for n in explanation.graphs[0].graph.nodes]
    assert nodes.count("cait.talking_heads_fused.default") == 2, nodes
    torch._dynamo.reset()
    compiled = torch.compile(model, mode=mode)
    grads = []
    for m in (model, compiled, compiled):  # twice: a CUDA graph replays on the second call
        model.zero_grad()
        m(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(grads[0], grads[2], strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
