"""Unit maths of the layers against reference formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cait.models.layers import (
    ClassAttention,
    ClassAttentionBlock,
    DropPath,
    PatchEmbed,
    SelfAttentionBlock,
    TalkingHeadAttention,
    make_branch_scale,
    resample_pos_embed,
    uses_pre_norm,
)


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def test_talking_heads_equals_loop_over_heads():
    torch.manual_seed(0)
    B, N, C, H = 2, 5, 12, 3
    attn = TalkingHeadAttention(C, H).eval()
    _randomize(attn)
    x = torch.randn(B, N, C)
    out, probs = attn(x, return_attn=True)

    hd = C // H
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias
    q, k, v = qkv.split(C, dim=-1)
    heads = [slice(h * hd, (h + 1) * hd) for h in range(H)]
    logits = [q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd) for s in heads]
    Wl, bl, Ww, bw = attn.proj_l.weight, attn.proj_l.bias, attn.proj_w.weight, attn.proj_w.bias
    mixed = [sum(Wl[g, h] * logits[h] for h in range(H)) + bl[g] for g in range(H)]
    soft = [m.softmax(-1) for m in mixed]
    weights = [sum(Ww[g, h] * soft[h] for h in range(H)) + bw[g] for g in range(H)]
    ctx = torch.cat([weights[g] @ v[..., heads[g]] for g in range(H)], dim=-1)
    expected = ctx @ attn.proj.weight.t() + attn.proj.bias

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, torch.stack(soft, dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, N))


def test_plain_attention_fused_equals_eager():
    torch.manual_seed(0)
    attn = TalkingHeadAttention(16, 4, talking_heads=False).eval()
    _randomize(attn)
    assert not hasattr(attn, "proj_l")
    x = torch.randn(2, 7, 16)
    fused, none = attn(x)
    eager, probs = attn(x, return_attn=True)
    assert none is None
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 4, 7, 7)


def test_class_attention_equals_formula():
    torch.manual_seed(0)
    B, N, C, H = 2, 6, 8, 2
    ca = ClassAttention(C, H).eval()
    _randomize(ca)
    x = torch.randn(B, 1 + N, C)
    out, probs = ca(x, return_attn=True)
    fused, _ = ca(x)

    hd = C // H
    q = ca.q(x[:, :1])
    k, v = ca.k(x), ca.v(x)
    ctx = []
    for h in range(H):
        s = slice(h * hd, (h + 1) * hd)
        a = (q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # (B, 1, 1+N)
        torch.testing.assert_close(probs[:, h], a, atol=1e-6, rtol=1e-5)
        ctx.append(a @ v[..., s])
    expected = ca.proj(torch.cat(ctx, dim=-1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    assert probs.shape == (B, H, 1, 1 + N)


@pytest.mark.parametrize("queries", [1, 2])
def test_class_attention_runs_sdpa_and_equals_the_traced_path(queries, monkeypatch):
    """The untraced path is ``F.scaled_dot_product_attention`` (one query token per class
    token: plain attention); output and every gradient equal the traced path's, which
    computes the attention map it returns."""
    torch.manual_seed(0)
    ca = ClassAttention(8, 2)
    _randomize(ca)
    x = torch.randn(3, queries + 6, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(1) or sdpa(*a, **k),
    )
    results = []
    for trace in (False, True):
        ca.zero_grad()
        xi = x.clone().requires_grad_()
        out, attn = ca(xi, num_queries=queries, return_attn=trace)
        assert (attn is None) != trace and len(calls) == 1
        out.square().sum().backward()
        results.append([out, xi.grad, *(p.grad for p in ca.parameters())])
    for fused, traced in zip(*results, strict=True):
        torch.testing.assert_close(fused, traced, atol=1e-5, rtol=1e-5)


def test_class_attention_block_updates_the_class_token_only():
    torch.manual_seed(0)
    block = ClassAttentionBlock(8, 2, init_scale=0.5).eval()
    x, cls = torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    trace = []
    out = block(x, cls, trace=trace)
    torch.testing.assert_close(out, block(x, cls))
    assert out.shape == (2, 1, 8) and len(trace) == 1
    torch.testing.assert_close(trace[0].stream, cls)
    torch.testing.assert_close(trace[0].output, out)
    expected_attn = block.gamma_1 * block.attn(block.norm1(torch.cat((cls, x), 1)))[0]
    torch.testing.assert_close(trace[0].attn_branch, expected_attn)
    assert trace[0].attn.shape == (2, 2, 1, 5)


def test_self_attention_block_is_the_two_residual_equations():
    torch.manual_seed(0)
    block = SelfAttentionBlock(12, 3, init_scale=0.3).eval()
    _randomize(block)
    x = torch.randn(2, 5, 12)
    y = x + block.gamma_1 * block.attn(block.norm1(x))[0]
    y = y + block.gamma_2 * block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x), y)
    trace = []
    out = block(x, trace=trace)
    torch.testing.assert_close(out, y)
    torch.testing.assert_close(trace[0].output, y)
    torch.testing.assert_close(
        trace[0].mid_stream, x + block.gamma_1 * block.attn(block.norm1(x))[0]
    )
    assert trace[0].attn.shape == (2, 3, 5, 5)


@pytest.mark.parametrize("make", [SelfAttentionBlock, ClassAttentionBlock], ids=["sa", "ca"])
def test_traced_branches_are_exact_at_tiny_layerscale(make):
    # at LayerScale 1e-5 a branch is ~1e-5 of the stream: recovered as output - stream it
    # would keep only a few bits, so the trace must hold the scaled branch itself
    torch.manual_seed(0)
    block = make(16, 2, init_scale=1e-5).eval()
    x, cls = 100 * torch.randn(2, 6, 16), 100 * torch.randn(2, 1, 16)
    sa = make is SelfAttentionBlock
    args, stream, u = ((x,), x, x) if sa else ((x, cls), cls, torch.cat((cls, x), 1))
    trace = []
    with torch.no_grad():
        block(*args, trace=trace)
        a = block.attn(block.norm1(u), return_attn=True)[0]  # the plain path, as traced
        mid = stream + block.gamma_1 * a
        m = block.mlp(block.norm2(mid))
    torch.testing.assert_close(trace[0].attn_branch, block.gamma_1 * a, atol=0, rtol=1e-5)
    torch.testing.assert_close(trace[0].mlp_branch, block.gamma_2 * m, atol=0, rtol=1e-5)


def test_traced_branches_carry_the_drop_path_of_training():
    torch.manual_seed(0)
    block = SelfAttentionBlock(8, 2, init_scale=0.5, drop_path=0.5).train()
    x = torch.randn(64, 3, 8)
    trace = []
    out = block(x, trace=trace)
    torch.testing.assert_close(trace[0].output, out)
    dropped = trace[0].attn_branch.flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < 64  # whole samples dropped, as in the untraced forward


@pytest.mark.parametrize(
    "mode,shape,value,pre_norm",
    [
        ("layerscale", (8,), 1e-5, True),
        ("rezero", (1,), 0.0, False),
        ("skipinit", (1,), 1e-5, False),
        ("fixup", (1,), 1e-5, True),
        ("none", None, None, True),
    ],
)
def test_branch_scales(mode, shape, value, pre_norm):
    gamma = make_branch_scale(mode, 8, 1e-5)
    assert uses_pre_norm(mode) is pre_norm
    if shape is None:
        assert gamma is None
    else:
        assert gamma.shape == shape
        assert torch.all(gamma == value)
    block = SelfAttentionBlock(8, 2, branch_scale=mode, init_scale=1e-5)
    assert isinstance(block.norm1, torch.nn.LayerNorm) is pre_norm


def test_branch_scale_rejects_unknown_mode():
    with pytest.raises(ValueError, match="branch_scale"):
        make_branch_scale("batchnorm", 8, 0.1)


def test_drop_path_is_per_sample_and_unbiased():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(4000, 3, 2)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    # each sample is either dropped entirely or kept and scaled by 1 / (1 - p)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert abs(y.mean().item() - 1.0) < 0.05
    torch.testing.assert_close(dp.eval()(x), x)
    with pytest.raises(ValueError, match="drop-path"):
        DropPath(1.0)


def test_patch_embed_checks_input():
    pe = PatchEmbed(4, 3, 8)
    assert pe(torch.randn(2, 3, 8, 12)).shape == (2, 6, 8)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        pe(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="multiples of the patch size 4, got 10x8"):
        pe(torch.randn(2, 3, 10, 8))
    with pytest.raises(ValueError, match="4-D"):
        pe(torch.randn(3, 8, 8))


def test_resample_pos_embed_keeps_prefix_and_identity():
    pos = torch.randn(1, 1 + 16, 5)
    same = resample_pos_embed(pos, (4, 4), num_prefix_tokens=1)
    assert same is pos
    bigger = resample_pos_embed(pos, (6, 8), num_prefix_tokens=1)
    assert bigger.shape == (1, 1 + 48, 5)
    torch.testing.assert_close(bigger[:, :1], pos[:, :1])
    # a constant field stays constant under bicubic resampling
    const = torch.full((1, 16, 3), 0.7)
    torch.testing.assert_close(resample_pos_embed(const, (7, 7)), torch.full((1, 49, 3), 0.7))
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.randn(1, 15, 5), (4, 4))
