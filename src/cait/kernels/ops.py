"""Talking-heads attention as ``torch.library`` custom ops, which ``torch.compile`` keeps whole.

A compiler that traces into a kernel's Python wrapper sees only the ops it can trace, so
before these ops ``torch.compile`` ran the Python path (many small matrix products, at
about half the eager speed on the CPU, docs/BENCHMARKS.md). Registered as an op with a fake
(meta) implementation, which gives the shapes of the outputs without computing them, and an
autograd formula, the kernel is one node of the compiled graph, forward and backward: no
graph break, and the same arithmetic compiled as eager.

- ``cait::talking_heads_cpu`` runs the C++ kernel (``csrc/talking_heads.cpp``, built by
  :mod:`cait.kernels.native`); its backward is ``cait::talking_heads_cpu_backward``.
  Its outputs are ``(out, probs, logits)``: the attention output ``(B, N, C)``, and with
  ``keep`` the softmax probabilities and raw logits ``(B, H, N, N)`` for the backward pass
  (empty without: inference, or ``recompute``, whose backward pass recomputes them).
- ``cait::talking_heads_fused`` runs the Triton kernels on CUDA
  (:mod:`cait.kernels.triton_talking_heads`), which keep only each row's log-sum-exp
  ``(B, H, N)`` for the backward pass, ``cait::talking_heads_fused_backward``.

The weights come in as the caller prepared them (``proj_l``'s weight times the softmax
scale; in the dtype of ``qkv`` for the C++ kernel, fp32 for the Triton kernels): the casts
stay outside the op, where autograd takes their gradients back to the parameters' dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cait.kernels import triton_talking_heads

__all__ = [
    "talking_heads_cpu",
    "talking_heads_cpu_backward",
    "talking_heads_fused",
    "talking_heads_fused_backward",
]


def _image_major(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N, 3C)`` -> ``q, k, v`` as ``(B, H, N, hd)`` views (no copy), the C++ layout."""
    B, N, C3 = qkv.shape
    qkv = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads))  # (B, N, 3, H, hd)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # type: ignore[return-value]


def _kept_shape(qkv: Tensor, num_heads: int, keep: bool) -> tuple[int, ...]:
    B, N, _ = qkv.shape
    return (B, num_heads, N, N) if keep else (0,)


@torch.library.custom_op("cait::talking_heads_cpu", mutates_args=(), device_types="cpu")
def talking_heads_cpu(
    qkv: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor, num_heads: int, keep: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out (B, N, C), probs, logits)`` by the C++ kernel, one image at a time on torch's
    intra-op threads. ``b_l`` is not read (a per-row shift of the logits, which the softmax
    removes); it is an input so that its gradient, exactly zero, reaches the parameter."""
    with torch.autocast("cpu", enabled=False):
        q, k, v = _image_major(qkv, num_heads)
        B, H, N, hd = q.shape
        bias = b_w[:, None] * v.sum(dim=2)  # (B, H, hd): proj_w's bias term
        out = qkv.new_empty(B, N, H, hd)
        probs = qkv.new_empty(_kept_shape(qkv, H, keep))
        logits = qkv.new_empty(_kept_shape(qkv, H, keep))
        torch.ops.cait.talking_heads_forward(
            q, k, v, w_l, w_w, bias, out, probs if keep else None, logits if keep else None
        )
    return out.view(B, N, H * hd), probs, logits


@talking_heads_cpu.register_fake
def _talking_heads_cpu_fake(
    qkv: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor, num_heads: int, keep: bool
) -> tuple[Tensor, Tensor, Tensor]:
    B, N, C3 = qkv.shape
    kept = _kept_shape(qkv, num_heads, keep)
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(kept), qkv.new_empty(kept)


@torch.library.custom_op("cait::talking_heads_cpu_backward", mutates_args=(), device_types="cpu")
def talking_heads_cpu_backward(
    g_out: Tensor,
    qkv: Tensor,
    w_l: Tensor,
    w_w: Tensor,
    b_w: Tensor,
    probs: Tensor,
    logits: Tensor,
    num_heads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(g_qkv (B, N, 3C), g_w_l, g_w_w, g_b_w)`` for ``g_out (B, N, C)``; empty ``probs``
    and ``logits`` (nothing kept) are recomputed image by image."""
    H = num_heads
    with torch.autocast("cpu", enabled=False):
        q, k, v = _image_major(qkv, H)
        B, _, N, hd = q.shape
        g_heads = g_out.to(qkv.dtype).reshape(B, N, H, hd).transpose(1, 2)  # (B, H, N, hd)
        g_qkv = qkv.new_empty(B, N, 3 * H * hd)
        g_q, g_k, g_v = _image_major(g_qkv, H)
        g_w_l, g_w_w = qkv.new_empty(B, H, H), qkv.new_empty(B, H, H)  # per image
        kept = probs.numel() > 0
        torch.ops.cait.talking_heads_backward(
            q,
            k,
            v,
            w_l,
            w_w,
            g_heads,
            probs if kept else None,
            logits if kept else None,
            g_q,
            g_k,
            g_v,
            g_w_l,
            g_w_w,
        )
        # proj_w's bias term: b_g * sum_j v_g[j] added to every output row of head g,
        # summed head-major as the Python path sums it
        g_out_sum = g_heads.transpose(0, 1).sum(dim=2)  # (H, B, hd)
        g_v.transpose(0, 1).add_((b_w[:, None, None] * g_out_sum)[:, :, None])
        g_b_w = (g_out_sum * v.transpose(0, 1).sum(dim=2)).sum(dim=(1, 2))
    return g_qkv, g_w_l.sum(dim=0), g_w_w.sum(dim=0), g_b_w  # summed in image order


@talking_heads_cpu_backward.register_fake
def _talking_heads_cpu_backward_fake(
    g_out: Tensor,
    qkv: Tensor,
    w_l: Tensor,
    w_w: Tensor,
    b_w: Tensor,
    probs: Tensor,
    logits: Tensor,
    num_heads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(qkv),
        torch.empty_like(w_l),
        torch.empty_like(w_w),
        torch.empty_like(b_w),
    )


def _cpu_setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple
) -> None:
    qkv, w_l, b_l, w_w, b_w, num_heads, _ = inputs
    _, probs, logits = output
    ctx.mark_non_differentiable(probs, logits)
    ctx.save_for_backward(qkv, w_l, b_l, w_w, b_w, probs, logits)
    ctx.num_heads = num_heads


def _cpu_backward(ctx: torch.autograd.function.FunctionCtx, g_out: Tensor, *_: Tensor) -> tuple:
    qkv, w_l, b_l, w_w, b_w, probs, logits = ctx.saved_tensors
    g_qkv, g_w_l, g_w_w, g_b_w = talking_heads_cpu_backward(
        g_out, qkv, w_l, w_w, b_w, probs, logits, ctx.num_heads
    )
    # proj_l's bias shifts every logit of a row by the same amount: zero gradient
    return g_qkv, g_w_l, torch.zeros_like(b_l), g_w_w, g_b_w, None, None


talking_heads_cpu.register_autograd(_cpu_backward, setup_context=_cpu_setup_context)


def _fused_forward(
    qkv: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor, num_heads: int
) -> tuple[Tensor, Tensor]:
    """``(out (B, N, C), lse (B, H, N) fp32)`` by the Triton kernels, which never write a
    ``(B, H, N, N)`` tensor (:mod:`cait.kernels.triton_talking_heads`). The weights are fp32;
    ``b_l`` is not read (see :func:`talking_heads_cpu`)."""
    qkv = qkv.contiguous()
    B, N, C3 = qkv.shape
    v = qkv.view(B, N, 3, num_heads, -1)[:, :, 2]  # (B, N, H, hd)
    bias = b_w[None, :, None] * v.sum(dim=1, dtype=torch.float32)  # (B, H, hd): proj_w's term
    return triton_talking_heads.forward(qkv, w_l, w_w, bias, num_heads)


# the implementations are named functions, so that the tests can register them for CPU
# tensors too, where TRITON_INTERPRET=1 runs the kernels
talking_heads_fused = torch.library.custom_op(
    "cait::talking_heads_fused", _fused_forward, mutates_args=(), device_types="cuda"
)


@talking_heads_fused.register_fake
def _talking_heads_fused_fake(
    qkv: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor, num_heads: int
) -> tuple[Tensor, Tensor]:
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


def _fused_backward_impl(
    g_out: Tensor, qkv: Tensor, w_l: Tensor, w_w: Tensor, b_w: Tensor, lse: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(g_qkv (B, N, 3C), g_w_l, g_w_w, g_b_w)``, recomputing what the forward pass did."""
    qkv, g_out = qkv.contiguous(), g_out.to(qkv.dtype).contiguous()
    B, N, C3 = qkv.shape
    H = num_heads
    g_qkv, g_w_l, g_w_w = triton_talking_heads.backward(g_out, qkv, w_l, w_w, lse, H)
    # proj_w's bias term: b_g * sum_j v_g[j] added to every output row of head g
    g_out_sum = g_out.view(B, N, H, -1).sum(dim=1, dtype=torch.float32)  # (B, H, hd)
    g_qkv.view(B, N, 3, H, -1)[:, :, 2] += (b_w[None, :, None] * g_out_sum)[:, None]
    v_sum = qkv.view(B, N, 3, H, -1)[:, :, 2].sum(dim=1, dtype=torch.float32)  # (B, H, hd)
    g_b_w = (g_out_sum * v_sum).sum(dim=(0, 2))
    return g_qkv.to(qkv.dtype), g_w_l, g_w_w, g_b_w


talking_heads_fused_backward = torch.library.custom_op(
    "cait::talking_heads_fused_backward",
    _fused_backward_impl,
    mutates_args=(),
    device_types="cuda",
)


@talking_heads_fused_backward.register_fake
def _talking_heads_fused_backward_fake(
    g_out: Tensor, qkv: Tensor, w_l: Tensor, w_w: Tensor, b_w: Tensor, lse: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(qkv),
        torch.empty_like(w_l),
        torch.empty_like(w_w),
        torch.empty_like(b_w),
    )


def _fused_setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple
) -> None:
    qkv, w_l, b_l, w_w, b_w, num_heads = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, w_l, b_l, w_w, b_w, output[1])
    ctx.num_heads = num_heads


def _fused_backward(ctx: torch.autograd.function.FunctionCtx, g_out: Tensor, _: Tensor) -> tuple:
    qkv, w_l, b_l, w_w, b_w, lse = ctx.saved_tensors
    g_qkv, g_w_l, g_w_w, g_b_w = talking_heads_fused_backward(
        g_out, qkv, w_l, w_w, b_w, lse, ctx.num_heads
    )
    return g_qkv, g_w_l, torch.zeros_like(b_l), g_w_w, g_b_w, None


talking_heads_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)
