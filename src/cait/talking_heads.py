"""Fast kernels for talking-heads attention (paper Section 3; Shazeer et al. 2020).

The reference computation (``TalkingHeadAttention`` with ``impl="plain"``, and timm) mixes
heads with ``Linear(H, H)`` applied on a ``(B, N, N, H)`` permuted view: every mixing step
copies the ``(B, H, N, N)`` tensor twice and runs a matrix product whose inner size is ``H``
(4 in the XXS models) over ``B * N * N`` rows, which is slow on every BLAS.

Here the attention tensor stays in its contiguous ``(B, H, N, N)`` layout and each mixing
step is one batched product ``(H, H) @ (H, N * N)`` per image: the long ``N * N`` dimension
is the output width, the bias is added by the same call (``baddbmm``) and no permute copy
is made. The softmax scale is folded into the (tiny) ``proj_l`` weight.

:func:`talking_heads_attention` is that forward, differentiated by autograd (it keeps the
raw logits, the probabilities and the mixed weights for the backward pass, as the reference
does). :func:`talking_heads_attention_recompute` computes the same result but keeps only the
softmax probabilities: the backward pass recomputes the raw logits (``q k^T``) and the
mixed weights from them, so a block holds one ``(B, H, N, N)`` tensor between forward and
backward instead of three.

Shapes: ``q, k, v (B, H, N, hd)``; ``w_l, w_w (H, H)``; ``b_l, b_w (H,)``; output
``(B, H, N, hd)``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["mix_heads", "talking_heads_attention", "talking_heads_attention_recompute"]


def mix_heads(t: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out[b, g] = sum_h weight[g, h] * t[b, h] + bias[g]`` on a contiguous ``(B, H, N, M)``.

    One batched matrix product ``(H, H) @ (H, N * M)`` per image, with the bias added by the
    product itself (``beta = 1``): no permuted copies.
    """
    B, H, N, M = t.shape
    flat = t.reshape(B, H, N * M)  # (B, H, N*M), a view when t is contiguous
    w = weight.expand(B, H, H)
    if bias is None:
        out = torch.bmm(w, flat)
    else:
        out = torch.baddbmm(bias.view(1, H, 1), w, flat)
    return out.view(B, H, N, M)


def _softmax(z: Tensor) -> Tensor:
    """Softmax over keys, accumulated in fp32 for half inputs and returned in their dtype."""
    if z.dtype in (torch.float16, torch.bfloat16):
        return z.softmax(dim=-1, dtype=torch.float32).to(z.dtype)
    return z.softmax(dim=-1)


def talking_heads_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_l: Tensor,
    b_l: Tensor,
    w_w: Tensor,
    b_w: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Talking-heads attention on contiguous heads, differentiated by autograd.

    ``softmax(proj_l(scale * q k^T))`` mixed by ``proj_w``, then dropout, then ``@ v``; the
    ``proj_l`` bias enters as the reference adds it, although a per-head constant does not
    change the softmax.
    """
    logits = q @ k.transpose(-2, -1)  # (B, H, N, N), contiguous
    attn = mix_heads(logits, w_l * scale, b_l).softmax(dim=-1)  # (B, H, N, N)
    weights = mix_heads(attn, w_w, b_w)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return weights @ v  # (B, H, N, hd)


class _TalkingHeadsRecompute(torch.autograd.Function):
    """Forward as :func:`talking_heads_attention`; backward from the saved probabilities."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        w_l: Tensor,
        b_l: Tensor,
        w_w: Tensor,
        b_w: Tensor,
    ) -> Tensor:
        dtype = q.dtype
        with torch.autocast(q.device.type, enabled=False):
            w_l_, b_l_, w_w_, b_w_ = (t.to(dtype) for t in (w_l, b_l, w_w, b_w))
            k, v = k.to(dtype), v.to(dtype)
            attn = _softmax(mix_heads(q @ k.transpose(-2, -1), w_l_, b_l_))  # (B, H, N, N)
            out = mix_heads(attn, w_w_, b_w_) @ v  # (B, H, N, hd)
        ctx.save_for_backward(q, k, v, w_l_, w_w_, b_w_, attn)
        ctx.param_dtypes = (w_l.dtype, b_l.dtype, w_w.dtype, b_w.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, ...]:
        q, k, v, w_l, w_w, b_w, attn = ctx.saved_tensors
        B, H, N, M = attn.shape
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype)
            weights = mix_heads(attn, w_w, b_w)  # recomputed (B, H, N, N)
            grad_v = weights.transpose(-2, -1) @ grad_out
            del weights
            grad_weights = grad_out @ v.transpose(-2, -1)  # (B, H, N, N)
            flat_gw = grad_weights.view(B, H, N * M)
            grad_w_w = (flat_gw @ attn.view(B, H, N * M).transpose(1, 2)).sum(0)
            grad_b_w = flat_gw.sum(dim=(0, 2))
            grad_attn = mix_heads(grad_weights, w_w.t())
            del grad_weights, flat_gw
            grad_z = torch.ops.aten._softmax_backward_data(grad_attn, attn, -1, attn.dtype)
            del grad_attn
            logits = q @ k.transpose(-2, -1)  # recomputed (B, H, N, N)
            flat_gz = grad_z.view(B, H, N * M)
            grad_w_l = (flat_gz @ logits.view(B, H, N * M).transpose(1, 2)).sum(0)
            del logits
            grad_b_l = flat_gz.sum(dim=(0, 2))
            grad_logits = mix_heads(grad_z, w_l.t())
            del grad_z, flat_gz
            grad_q = grad_logits @ k
            grad_k = grad_logits.transpose(-2, -1) @ q
        dt_wl, dt_bl, dt_ww, dt_bw = ctx.param_dtypes
        return (
            grad_q,
            grad_k,
            grad_v,
            grad_w_l.to(dt_wl),
            grad_b_l.to(dt_bl),
            grad_w_w.to(dt_ww),
            grad_b_w.to(dt_bw),
        )


def talking_heads_attention_recompute(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_l: Tensor,
    b_l: Tensor,
    w_w: Tensor,
    b_w: Tensor,
    scale: float,
) -> Tensor:
    """Same result as :func:`talking_heads_attention` (no dropout), keeping only the softmax
    probabilities ``(B, H, N, N)`` for the backward pass."""
    return _TalkingHeadsRecompute.apply(q, k, v, w_l * scale, b_l, w_w, b_w)
