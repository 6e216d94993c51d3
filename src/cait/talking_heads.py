"""Fast kernels for talking-heads attention (paper Section 3; Shazeer et al. 2020).

The reference computation (``TalkingHeadAttention`` with ``impl="plain"``, and timm) lays
the attention out as ``(B, H, N, N)`` and mixes heads with ``Linear(H, H)`` on a
``(B, N, N, H)`` permuted view: every mixing step copies the attention tensor twice and
runs a matrix product whose inner size is ``H`` (4 in the XXS models) over ``B * N * N``
rows; ``q``, ``k`` and ``v`` are also copied out of the ``qkv`` output to make them
contiguous per head.

Here the attention lives head-major, ``(H, B, N, N)``:

- ``q k^T`` is computed per head by one batched product over the images, reading ``q`` and
  ``k`` in place from the ``qkv`` output ``(B, N, 3, H, hd)`` (a strided operand, no copy);
- each mixing step is a single product ``(H, H) @ (H, B * N * N)`` with the long
  dimension as the output width; the softmax scale is folded into ``proj_l``'s weight;
- ``proj_l``'s bias adds a constant per head to every logit of a row, which the softmax
  removes exactly, so it is left out (its gradient is exactly zero);
- ``proj_w``'s bias adds ``b_g`` to every weight of head ``g``, which contributes
  ``b_g * sum_j v_g[j]`` to each output row: a ``(B, H, hd)`` term instead of a pass over
  the attention tensor.

The backward pass is written out (:class:`_TalkingHeads`): it keeps the ``qkv`` output, the
softmax probabilities and, unless ``recompute``, the raw logits; the mixed weights (and with
``recompute`` the logits) are recomputed, so a block holds two, or one, ``(B, H, N, N)``
tensors between forward and backward instead of the reference's three (plus the copies
autograd keeps of the permuted views).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["CPU_CHUNK_BYTES", "talking_heads_attention"]

# On the CPU the images are processed in chunks whose attention tensor (H x b x N x N) takes
# about this many bytes, so that the logits, probabilities and mixed weights of a chunk stay
# in cache between the steps that read them. Chosen by measurement on this project's 2-core
# AMD EPYC (1 MiB L2 per core, 32 MiB L3): for cait_xxs24_224's attention (0.6 MB per
# image) chunks of 4 images ran the forward pass 2.4x and forward plus backward 1.9x faster
# than the whole batch of 32 at once (one thread, shared machine; docs/BENCHMARKS.md).
# On a GPU the whole batch is one chunk.
CPU_CHUNK_BYTES = 5 * 2**19


def _heads_bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``out[h] = a[h] @ b[h]`` for every head of head-major ``(H, B, X, Y)`` operands.

    In eager mode each ``a[h]`` and ``b[h]`` is a batch of matrices with one batch stride,
    which the batched product reads in place even when it is a strided view into ``qkv``,
    writing into ``out`` (allocated when not given). Under ``torch.compile`` it is a plain
    ``matmul`` (``out=`` does not survive functionalisation; the compiler picks layouts).
    """
    if torch.compiler.is_compiling():
        return torch.matmul(a, b)
    if out is None:
        out = a.new_empty(a.shape[:-1] + b.shape[-1:])
    for h in range(out.shape[0]):
        torch.bmm(a[h], b[h], out=out[h])
    return out


def _mix(weight: Tensor, t: Tensor) -> Tensor:
    """Head mixing on a head-major tensor: ``out[g] = sum_h weight[g, h] t[h]``."""
    H = t.shape[0]
    return torch.mm(weight, t.view(H, -1)).view(t.shape)


def _token_major(ctx_heads: Tensor, bias: Tensor) -> Tensor:
    """``ctx_heads + bias`` as a new contiguous ``(B, N, H, hd)`` tensor, in one pass."""
    if torch.compiler.is_compiling():
        return (ctx_heads + bias).contiguous()
    out = ctx_heads.new_empty(ctx_heads.shape)
    return torch.add(ctx_heads, bias, out=out)


def _softmax(z: Tensor) -> Tensor:
    """Softmax over keys, accumulated in fp32 for fp16/bf16 and returned in their dtype."""
    if z.dtype in (torch.float16, torch.bfloat16):
        return z.softmax(dim=-1, dtype=torch.float32).to(z.dtype)
    return z.softmax(dim=-1)


def _split(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N, 3C)`` -> ``q, k, v``, each a head-major ``(H, B, N, hd)`` view (no copy)."""
    B, N, C3 = qkv.shape
    qkv = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads))  # (B, N, 3, H, hd)
    return qkv.permute(2, 3, 0, 1, 4).unbind(0)


class _TalkingHeads(torch.autograd.Function):
    """``qkv (B, N, 3C) -> (B, N, C)``: talking-heads attention before the output projection."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        qkv: Tensor,
        w_l: Tensor,
        b_l: Tensor,
        w_w: Tensor,
        b_w: Tensor,
        num_heads: int,
        recompute: bool,
    ) -> Tensor:
        dtype, H = qkv.dtype, num_heads
        with torch.autocast(qkv.device.type, enabled=False):
            w_l_, w_w_, b_w_ = w_l.to(dtype), w_w.to(dtype), b_w.to(dtype)
            q, k, v = _split(qkv, H)  # (H, B, N, hd) views
            _, B, N, hd = q.shape
            logits = _heads_bmm(q, k.transpose(2, 3))  # (H, B, N, N)
            attn = _softmax(_mix(w_l_, logits))
            weights = _mix(w_w_, attn)
            ctx_heads = _heads_bmm(weights, v)  # (H, B, N, hd)
            del weights
            bias = b_w_[:, None, None] * v.sum(dim=2)  # (H, B, hd): proj_w's bias term
            out = _token_major(ctx_heads.permute(1, 2, 0, 3), bias.permute(1, 0, 2)[:, None])
        ctx.num_heads = H
        ctx.param_dtypes = (w_l.dtype, b_l.dtype, w_w.dtype, b_w.dtype)
        ctx.save_for_backward(qkv, w_l_, w_w_, b_w_, attn, None if recompute else logits)
        return out.view(B, N, H * hd)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qkv, w_l, w_w, b_w, attn, logits = ctx.saved_tensors
        H = ctx.num_heads
        with torch.autocast(qkv.device.type, enabled=False):
            q, k, v = _split(qkv, H)  # (H, B, N, hd) views
            _, B, N, hd = q.shape
            g_out = grad_out.to(qkv.dtype).reshape(B, N, H, hd).permute(2, 0, 1, 3)  # (H,B,N,hd)
            compiling = torch.compiler.is_compiling()
            grads = None if compiling else qkv.new_empty(3, H, B, N, hd)  # dq, dk, dv
            g_out_sum = g_out.sum(dim=2)  # (H, B, hd)
            weights = _mix(w_w, attn)  # recomputed, without proj_w's bias
            g_v = _heads_bmm(weights.transpose(2, 3), g_out, None if compiling else grads[2])
            g_v += (b_w[:, None, None] * g_out_sum)[:, :, None]
            g_b_w = (g_out_sum * v.sum(dim=2)).sum(dim=(1, 2))
            g_weights = _heads_bmm(g_out, v.transpose(2, 3), None if compiling else weights)
            g_w_w = torch.mm(g_weights.view(H, -1), attn.view(H, -1).t())
            g_attn = _mix(w_w.t(), g_weights)
            del weights, g_weights
            g_z = torch.ops.aten._softmax_backward_data(g_attn, attn, -1, attn.dtype)
            del g_attn
            if logits is None:
                logits = _heads_bmm(q, k.transpose(2, 3))
            g_w_l = torch.mm(g_z.view(H, -1), logits.view(H, -1).t())
            del logits
            g_logits = _mix(w_l.t(), g_z)
            del g_z
            g_q = _heads_bmm(g_logits, k, None if compiling else grads[0])
            g_k = _heads_bmm(g_logits.transpose(2, 3), q, None if compiling else grads[1])
            if compiling:
                grads = torch.stack((g_q, g_k, g_v))  # (3, H, B, N, hd)
            g_qkv = grads.permute(2, 3, 0, 1, 4).reshape(B, N, 3 * H * hd)
        dt_wl, dt_bl, dt_ww, dt_bw = ctx.param_dtypes
        # proj_l's bias shifts every logit of a row by the same amount: zero gradient
        g_b_l = torch.zeros(H, dtype=dt_bl, device=qkv.device)
        return g_qkv, g_w_l.to(dt_wl), g_b_l, g_w_w.to(dt_ww), g_b_w.to(dt_bw), None, None


def talking_heads_attention(
    qkv: Tensor,
    num_heads: int,
    w_l: Tensor,
    b_l: Tensor,
    w_w: Tensor,
    b_w: Tensor,
    scale: float,
    recompute: bool = False,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Talking-heads attention from the ``qkv`` projection, ``(B, N, 3C) -> (B, N, C)``.

    ``softmax(proj_l(scale * q k^T))`` mixed by ``proj_w``, then ``@ v``, heads concatenated
    (the input of the output projection). ``w_l, b_l`` are ``proj_l``'s weight and bias,
    ``w_w, b_w`` ``proj_w``'s. No attention dropout. With ``recompute`` the backward pass
    recomputes the raw logits instead of keeping them. The batch is processed in chunks of
    about ``chunk_bytes`` of attention tensor (default :data:`CPU_CHUNK_BYTES` on the CPU,
    the whole batch elsewhere; ``0`` for the whole batch).
    """
    B, N, _ = qkv.shape
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if qkv.device.type == "cpu" else 0
    per_image = num_heads * N * N * qkv.element_size()
    chunk = max(1, chunk_bytes // per_image) if chunk_bytes > 0 else B
    w_l = w_l * scale
    outs = [
        _TalkingHeads.apply(part, w_l, b_l, w_w, b_w, num_heads, recompute)
        for part in qkv.split(chunk, dim=0)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
