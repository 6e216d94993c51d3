"""Fused talking-heads self-attention in Triton: nothing of size ``(B, H, N, N)`` is written.

One program takes one image and a tile of ``BM`` query rows with **all** its heads at once
(the head mixings need every head of a logit): for each tile of ``BN`` keys it computes the
``H`` logit tiles ``q_h k_h^T`` (one matrix product each), mixes them with ``proj_l``
(the softmax scale folded into its weight) into a ``(H, BM, BN)`` block, and so on, as the
reference computes the whole ``(B, H, N, N)`` tensor, but tile by tile in registers:

- **forward** (two passes over the keys, as the softmax of a *mixed* logit needs the row's
  maximum and sum before the probabilities can be mixed by ``proj_w``): pass 1 computes the
  mixed logits and the running maximum and sum of each row of each mixed head (online);
  pass 2 computes them again, the probabilities, their mixing by ``proj_w`` and the
  product with ``v``. Kept for the backward pass: the log-sum-exp of each row, ``(B, H, N)``
  fp32, as FlashAttention keeps.
- **backward** (recomputes, as FlashAttention's does): per query tile, one pass computes
  ``D = rowsum(P * dP)`` of each mixed head (the softmax backward's correction; the
  FlashAttention shortcut ``rowsum(dO * O)`` does not hold once ``proj_w`` mixes the
  probabilities), a second the query gradient; per key tile, one pass over the queries
  computes the key and value gradients and the tile's share of the two mixing weights'
  gradients (summed afterwards in a fixed order).

Counts per image, with ``F = N * N`` (one logit per head): the reference spends
``4 H hd F`` FLOPs in ``q k^T`` and ``@ v`` and ``4 H^2 F`` in the two mixings, and moves
(reads plus writes) about ``12 H F`` elements of attention tensor in the forward pass (logits,
mixed logits, probabilities, mixed weights: each written once and read at least twice, the
permuted copies of the mixings included). Here the forward pass spends
``(6 hd + 6 H) H F`` FLOPs (``q k^T`` and the first mixing twice) and moves only ``q, k, v``
(``3 N H hd`` elements, read ``N / BM`` times from L2 by as many query tiles), the output and
the log-sum-exp; the backward pass spends about ``(14 hd + 12 H) H F`` FLOPs (``q k^T`` and
the mixings recomputed by each of its three passes, five products with ``hd`` inside) and
again moves only ``O(N H hd)`` per tile sweep. At ``cait_s24_224`` (``H = 8``, ``hd = 48``,
``N = 196``) the attention tensors of one layer in bf16 are 0.6 MB per image against 0.23 MB
of ``q, k, v``: the kernels trade about 1.5x the FLOPs for a memory-bound tensor never
written.

The weights and the softmax statistics are fp32; products of bf16/fp16 inputs accumulate in
fp32 (``tl.dot``), and fp32 inputs multiply in full fp32 (``input_precision="ieee"``, no
TF32, as torch's matmul by default). ``proj_l``'s bias is left out (a constant per row of the
logits, which the softmax removes); ``proj_w``'s bias arrives as its ``(B, H, hd)`` term
``b_g * sum_j v_g[j]``, added to each output row (:mod:`cait.kernels.talking_heads`).

Without Triton (macOS, Windows) :data:`AVAILABLE` is False and nothing here is defined as a
kernel. ``TRITON_INTERPRET=1`` runs the kernels on the CPU (slowly; the tests' small
shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    _jit = triton.jit
except ImportError:  # no Triton on this platform: the CUDA path is the Python one
    AVAILABLE = False

    def _jit(fn):  # type: ignore[no-redef]
        return fn


__all__ = ["AVAILABLE", "MAX_HEAD_DIM", "MAX_HEADS", "backward", "forward", "supports"]

# Shapes the kernels take: every released variant has 4-16 heads of 48 channels; up to 16
# heads keep the (H, BM, BN) blocks of a tile in registers at BM = BN = 16.
MAX_HEADS = 16
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(num_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels run this shape and dtype (otherwise the Python path does)."""
    return AVAILABLE and num_heads <= MAX_HEADS and head_dim <= MAX_HEAD_DIM and dtype in DTYPES


def _tiles(num_heads: int, head_dim: int) -> dict[str, int]:
    """Tile sizes: heads and head dim padded to powers of two (``tl.arange``), query and key
    tiles small enough that a tile's ``H`` logit blocks stay in registers, and more warps
    (registers) for more heads. Chosen by counting registers, not yet tuned on a GPU."""
    HP = triton.next_power_of_2(num_heads)
    block = 32 if HP <= 4 else 16
    BD = max(16, triton.next_power_of_2(head_dim))
    return dict(HP=HP, BD=BD, BM=block, BN=block, num_warps=4 if HP <= 4 else 8)


@_jit
def _mixed_logits(
    base, WL, offs_m, offs_n, offs_h, offs_d, N, C, s_n, H: tl.constexpr, HP: tl.constexpr,
    HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``sum_h W_l[:, h] (q_h k_h^T)`` for a (query tile, key tile): ``(HP, BM, BN)`` fp32,
    keys past ``N`` at ``-inf``."""
    mq = (offs_m[:, None] < N) & (offs_d[None, :] < HD)
    mk = (offs_n[:, None] < N) & (offs_d[None, :] < HD)
    mixed = tl.zeros((HP, BM, BN), dtype=tl.float32)
    for h in tl.static_range(H):
        q = tl.load(base + offs_m[:, None] * s_n + h * HD + offs_d[None, :], mask=mq, other=0.0)
        k = tl.load(base + offs_n[:, None] * s_n + C + h * HD + offs_d[None, :], mask=mk, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BM, BN)
        w = tl.load(WL + offs_h * H + h, mask=offs_h < H, other=0.0)  # W_l[:, h]
        mixed += w[:, None, None] * s[None, :, :]
    return tl.where((offs_n < N)[None, None, :], mixed, float("-inf"))


@_jit
def _probs(mixed, LSE_b, offs_m, offs_n, offs_h, N, H: tl.constexpr):
    """The softmax probabilities of a tile from the rows' log-sum-exp, 0 outside the shape."""
    ok_rows = (offs_h[:, None] < H) & (offs_m[None, :] < N)
    lse = tl.load(LSE_b + offs_h[:, None] * N + offs_m[None, :], mask=ok_rows, other=0.0)
    p = tl.exp(mixed - lse[:, :, None])
    return tl.where(ok_rows[:, :, None] & (offs_n < N)[None, None, :], p, 0.0)


@_jit
def _probs_grad(
    base, G_b, WW, offs_m, offs_n, offs_h, offs_d, N, C, s_n, s_gn, H: tl.constexpr,
    HP: tl.constexpr, HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``dP[g] = sum_g' W_w[g', g] (dO_g' v_g'^T)``, the probabilities' gradient of a tile."""
    mq = (offs_m[:, None] < N) & (offs_d[None, :] < HD)
    mk = (offs_n[:, None] < N) & (offs_d[None, :] < HD)
    dp = tl.zeros((HP, BM, BN), dtype=tl.float32)
    for g in tl.static_range(H):
        do = tl.load(G_b + offs_m[:, None] * s_gn + g * HD + offs_d[None, :], mask=mq, other=0.0)
        v = tl.load(
            base + offs_n[:, None] * s_n + 2 * C + g * HD + offs_d[None, :], mask=mk, other=0.0
        )
        da = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN)
        w = tl.load(WW + g * H + offs_h, mask=offs_h < H, other=0.0)  # W_w[g, :]
        dp += w[:, None, None] * da[None, :, :]
    return dp


@_jit
def _forward_kernel(
    QKV, WL, WW, BIAS, OUT, LSE, N, C, s_b, s_n, s_ob, s_on, H: tl.constexpr, HP: tl.constexpr,
    HD: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_h, offs_d = tl.arange(0, HP), tl.arange(0, BD)
    base = QKV + b * s_b
    # pass 1: the maximum and the sum of every row of every mixed head, online
    row_max = tl.full((HP, BM), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((HP, BM), dtype=tl.float32)
    for start in range(0, N, BN):
        offs_n = start + tl.arange(0, BN)
        mixed = _mixed_logits(
            base, WL, offs_m, offs_n, offs_h, offs_d, N, C, s_n, H, HP, HD, BM, BN, PREC
        )
        new_max = tl.maximum(row_max, tl.max(mixed, axis=2))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(
            tl.exp(mixed - new_max[:, :, None]), axis=2
        )
        row_max = new_max
    lse = row_max + tl.log(row_sum)  # (HP, BM)
    ok_rows = (offs_h[:, None] < H) & (offs_m[None, :] < N)
    tl.store(LSE + b * H * N + offs_h[:, None] * N + offs_m[None, :], lse, mask=ok_rows)
    # pass 2: probabilities, mixed by proj_w, times v
    acc = tl.zeros((HP, BM, BD), dtype=tl.float32)
    mk_d = offs_d[None, :] < HD
    for start in range(0, N, BN):
        offs_n = start + tl.arange(0, BN)
        mixed = _mixed_logits(
            base, WL, offs_m, offs_n, offs_h, offs_d, N, C, s_n, H, HP, HD, BM, BN, PREC
        )
        p = tl.where(offs_h[:, None, None] < H, tl.exp(mixed - lse[:, :, None]), 0.0)
        for g in tl.static_range(H):
            w = tl.load(WW + g * H + offs_h, mask=offs_h < H, other=0.0)  # W_w[g, :]
            a = tl.sum(w[:, None, None] * p, axis=0)  # (BM, BN): head g's attention weights
            v_ptr = base + offs_n[:, None] * s_n + 2 * C + g * HD + offs_d[None, :]
            v = tl.load(v_ptr, mask=(offs_n[:, None] < N) & mk_d, other=0.0)
            o = tl.dot(a.to(v.dtype), v, input_precision=PREC)  # (BM, BD)
            acc += tl.where(offs_h[:, None, None] == g, o[None, :, :], 0.0)
    ok = ok_rows[:, :, None] & (offs_d < HD)[None, None, :]
    ok_bias = (offs_h[:, None] < H) & (offs_d[None, :] < HD)
    bias = tl.load(BIAS + b * H * HD + offs_h[:, None] * HD + offs_d[None, :], mask=ok_bias)
    acc += bias[:, None, :]  # proj_w's bias term
    out = OUT + b * s_ob + offs_m[None, :, None] * s_on + offs_h[:, None, None] * HD
    tl.store(out + offs_d[None, None, :], acc.to(OUT.dtype.element_ty), mask=ok)


@_jit
def _backward_query_kernel(
    QKV, WL, WW, G, LSE, DELTA, GQ, N, C, s_b, s_n, s_gb, s_gn, H: tl.constexpr,
    HP: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Per query tile: ``D = rowsum(P * dP)`` (stored for the key kernel), then ``dq``."""
    b = tl.program_id(1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_h, offs_d = tl.arange(0, HP), tl.arange(0, BD)
    base, G_b, LSE_b = QKV + b * s_b, G + b * s_gb, LSE + b * H * N
    delta = tl.zeros((HP, BM), dtype=tl.float32)
    for start in range(0, N, BN):
        offs_n = start + tl.arange(0, BN)
        mixed = _mixed_logits(
            base, WL, offs_m, offs_n, offs_h, offs_d, N, C, s_n, H, HP, HD, BM, BN, PREC
        )
        p = _probs(mixed, LSE_b, offs_m, offs_n, offs_h, N, H)
        dp = _probs_grad(
            base, G_b, WW, offs_m, offs_n, offs_h, offs_d, N, C, s_n, s_gn, H, HP, HD, BM,
            BN, PREC,
        )  # fmt: skip
        delta += tl.sum(p * dp, axis=2)
    ok_rows = (offs_h[:, None] < H) & (offs_m[None, :] < N)
    tl.store(DELTA + b * H * N + offs_h[:, None] * N + offs_m[None, :], delta, mask=ok_rows)
    acc = tl.zeros((HP, BM, BD), dtype=tl.float32)
    mk_d = offs_d[None, :] < HD
    for start in range(0, N, BN):
        offs_n = start + tl.arange(0, BN)
        mixed = _mixed_logits(
            base, WL, offs_m, offs_n, offs_h, offs_d, N, C, s_n, H, HP, HD, BM, BN, PREC
        )
        p = _probs(mixed, LSE_b, offs_m, offs_n, offs_h, N, H)
        dp = _probs_grad(
            base, G_b, WW, offs_m, offs_n, offs_h, offs_d, N, C, s_n, s_gn, H, HP, HD, BM,
            BN, PREC,
        )  # fmt: skip
        dm = p * (dp - delta[:, :, None])  # the mixed logits' gradient
        for h in tl.static_range(H):
            w = tl.load(WL + offs_h * H + h, mask=offs_h < H, other=0.0)  # W_l[:, h]
            ds = tl.sum(w[:, None, None] * dm, axis=0)  # (BM, BN): raw logits' gradient
            k_ptr = base + offs_n[:, None] * s_n + C + h * HD + offs_d[None, :]
            k = tl.load(k_ptr, mask=(offs_n[:, None] < N) & mk_d, other=0.0)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # (BM, BD)
            acc += tl.where(offs_h[:, None, None] == h, dq[None, :, :], 0.0)
    ok = ok_rows[:, :, None] & (offs_d < HD)[None, None, :]
    gq = GQ + b * s_b + offs_m[None, :, None] * s_n + offs_h[:, None, None] * HD
    tl.store(gq + offs_d[None, None, :], acc, mask=ok)


@_jit
def _backward_key_kernel(
    QKV, WL, WW, G, LSE, DELTA, GQKV, GWL, GWW, N, C, s_b, s_n, s_gb, s_gn, H: tl.constexpr,
    HP: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Per key tile: ``dk``, ``dv`` and this tile's share of ``dW_l`` and ``dW_w``."""
    b, tile = tl.program_id(1), tl.program_id(0)
    offs_n = tile * BN + tl.arange(0, BN)
    offs_h, offs_d = tl.arange(0, HP), tl.arange(0, BD)
    base, G_b, LSE_b = QKV + b * s_b, G + b * s_gb, LSE + b * H * N
    mk = (offs_n[:, None] < N) & (offs_d[None, :] < HD)
    g_k = tl.zeros((HP, BN, BD), dtype=tl.float32)
    g_v = tl.zeros((HP, BN, BD), dtype=tl.float32)
    g_wl = tl.zeros((HP, HP), dtype=tl.float32)
    g_ww = tl.zeros((HP, HP), dtype=tl.float32)
    for start in range(0, N, BM):
        offs_m = start + tl.arange(0, BM)
        mq = (offs_m[:, None] < N) & (offs_d[None, :] < HD)
        mixed = _mixed_logits(
            base, WL, offs_m, offs_n, offs_h, offs_d, N, C, s_n, H, HP, HD, BM, BN, PREC
        )
        p = _probs(mixed, LSE_b, offs_m, offs_n, offs_h, N, H)
        dp = tl.zeros((HP, BM, BN), dtype=tl.float32)
        for g in tl.static_range(H):
            w = tl.load(WW + g * H + offs_h, mask=offs_h < H, other=0.0)  # W_w[g, :]
            a = tl.sum(w[:, None, None] * p, axis=0)  # head g's attention weights
            do = tl.load(
                G_b + offs_m[:, None] * s_gn + g * HD + offs_d[None, :], mask=mq, other=0.0
            )
            v_ptr = base + offs_n[:, None] * s_n + 2 * C + g * HD + offs_d[None, :]
            v = tl.load(v_ptr, mask=mk, other=0.0)
            da = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN)
            dv = tl.dot(tl.trans(a).to(do.dtype), do, input_precision=PREC)  # (BN, BD)
            g_v += tl.where(offs_h[:, None, None] == g, dv[None, :, :], 0.0)
            row = tl.sum(tl.sum(da[None, :, :] * p, axis=2), axis=1)  # dW_w[g, :]
            g_ww += tl.where(offs_h[:, None] == g, row[None, :], 0.0)
            dp += w[:, None, None] * da[None, :, :]
        delta = tl.load(
            DELTA + b * H * N + offs_h[:, None] * N + offs_m[None, :],
            mask=(offs_h[:, None] < H) & (offs_m[None, :] < N),
            other=0.0,
        )
        dm = p * (dp - delta[:, :, None])  # the mixed logits' gradient
        for h in tl.static_range(H):
            w = tl.load(WL + offs_h * H + h, mask=offs_h < H, other=0.0)  # W_l[:, h]
            ds = tl.sum(w[:, None, None] * dm, axis=0)  # (BM, BN): raw logits' gradient
            q = tl.load(base + offs_m[:, None] * s_n + h * HD + offs_d[None, :], mask=mq, other=0.0)
            k_ptr = base + offs_n[:, None] * s_n + C + h * HD + offs_d[None, :]
            k = tl.load(k_ptr, mask=mk, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)  # the raw logits, again
            col = tl.sum(tl.sum(dm * s[None, :, :], axis=2), axis=1)  # dW_l[:, h]
            g_wl += tl.where(offs_h[None, :] == h, col[:, None], 0.0)
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)  # (BN, BD)
            g_k += tl.where(offs_h[:, None, None] == h, dk[None, :, :], 0.0)
    ok = (offs_h[:, None, None] < H) & (offs_n[None, :, None] < N) & (offs_d < HD)[None, None, :]
    out = GQKV + b * s_b + offs_n[None, :, None] * s_n + offs_h[:, None, None] * HD
    tl.store(out + C + offs_d[None, None, :], g_k, mask=ok)
    tl.store(out + 2 * C + offs_d[None, None, :], g_v, mask=ok)
    ok_w = (offs_h[:, None] < H) & (offs_h[None, :] < H)
    part = (b * tl.num_programs(0) + tile) * H * H + offs_h[:, None] * H + offs_h[None, :]
    tl.store(GWL + part, g_wl, mask=ok_w)
    tl.store(GWW + part, g_ww, mask=ok_w)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(
    qkv: Tensor, w_l: Tensor, w_w: Tensor, bias: Tensor, num_heads: int
) -> tuple[Tensor, Tensor]:
    """``(out (B, N, C), lse (B, H, N) fp32)`` for a contiguous ``qkv (B, N, 3C)``; ``w_l``
    (scale folded in), ``w_w`` fp32 ``(H, H)``, ``bias`` fp32 ``(B, H, hd)``: proj_w's term."""
    B, N, C3 = qkv.shape
    C, H = C3 // 3, num_heads
    t = _tiles(H, C // H)
    out = qkv.new_empty(B, N, C)
    lse = qkv.new_empty(B, H, N, dtype=torch.float32)
    grid = (triton.cdiv(N, t["BM"]), B)
    _forward_kernel[grid](
        qkv, w_l, w_w, bias, out, lse, N, C, qkv.stride(0), qkv.stride(1), out.stride(0),
        out.stride(1), H=H, HD=C // H, PREC=_precision(qkv.dtype), **t,
    )  # fmt: skip
    return out, lse


def backward(
    g_out: Tensor, qkv: Tensor, w_l: Tensor, w_w: Tensor, lse: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_qkv (B, N, 3C) fp32, g_w_l, g_w_w)`` for contiguous ``g_out (B, N, C)`` in the
    dtype of ``qkv``, without the terms of ``proj_w``'s bias (the caller's)."""
    B, N, C3 = qkv.shape
    C, H = C3 // 3, num_heads
    t = _tiles(H, C // H)
    delta = torch.empty_like(lse)
    g_qkv = qkv.new_empty(B, N, C3, dtype=torch.float32)
    tiles = triton.cdiv(N, t["BN"])
    g_wl = qkv.new_empty(B, tiles, H, H, dtype=torch.float32)  # per program, summed below
    g_ww = torch.empty_like(g_wl)
    common = dict(H=H, HD=C // H, PREC=_precision(qkv.dtype), **t)
    strides = (qkv.stride(0), qkv.stride(1), g_out.stride(0), g_out.stride(1))
    _backward_query_kernel[(triton.cdiv(N, t["BM"]), B)](
        qkv, w_l, w_w, g_out, lse, delta, g_qkv, N, C, *strides, **common
    )
    _backward_key_kernel[(tiles, B)](
        qkv, w_l, w_w, g_out, lse, delta, g_qkv, g_wl, g_ww, N, C, *strides, **common
    )
    return g_qkv, g_wl.sum(dim=(0, 1)), g_ww.sum(dim=(0, 1))
