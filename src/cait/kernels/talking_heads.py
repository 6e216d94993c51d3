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

On the CPU the same steps run by default in a C++ kernel
(``cait/kernels/csrc/talking_heads.cpp``, built by :mod:`cait.kernels.native`), one image at
a time, whole images handed to torch's intra-op threads inside a single OpenMP region: the
steps on one image are too small to split over threads without the fork and join of every
op costing more than it saves, and one image's attention tensors stay in the core's cache
from one step to the next. Where the kernel cannot be built, the Python path below does the
same with chunks of a few images, shared between as many worker threads as torch has
intra-op threads, each running its chunks' ops on one thread
(:func:`cait.kernels.cpu_workers.run_on_cpu_workers`); every chunk's temporaries go into its
worker's reused buffers (:class:`_Scratch`). The Python path also runs on other devices
(the whole batch as one chunk) and under ``torch.export``.

The backward pass is written out (:class:`_TalkingHeads`). By default it keeps the ``qkv``
output, the softmax probabilities and the raw logits, and recomputes the mixed weights: two
``(B, H, N, N)`` tensors per block between forward and backward instead of the reference's
three (plus the copies autograd keeps of the permuted views). With ``recompute`` it keeps
none: the backward pass recomputes each image's or chunk's logits and probabilities, as
memory-efficient attention kernels do, for one extra ``q k^T``, mixing and softmax.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from cait.kernels import native, ops, triton_talking_heads
from cait.kernels.cpu_workers import run_on_cpu_workers

__all__ = ["CPU_CHUNK_BYTES", "talking_heads_attention"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# On the CPU the images are processed in chunks whose attention tensor (H x b x N x N) takes
# about this many bytes (2.5 MiB), so that the logits, probabilities and mixed weights of a
# chunk stay in a core's cache between the steps that read them, while each op still covers
# a few images (4 of cait_xxs24_224, whose H = 4 and N = 197 make 0.6 MB an image in fp32).
# The size was chosen by timing the Python path by chunk size, threads and workers with
# `python examples/attention_chunks.py`; docs/BENCHMARKS.md ("CPU results") records the
# figures and the machine they were measured on. On a GPU the whole batch is one chunk.
CPU_CHUNK_BYTES = 5 * 2**19


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off: the steps keep the dtype of ``qkv``. ``meta`` tensors (FLOP counting,
    :mod:`cait.bench.flops`) have no autocast to turn off."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


@torch.compiler.assume_constant_result
def _fused_supported(num_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take this shape; a shape they do not take is logged once
    (a compiler calls this once while tracing)."""
    if triton_talking_heads.supports(num_heads, head_dim, dtype):
        return True
    _log_fallback(num_heads, head_dim, dtype)
    return False


@functools.cache
def _log_fallback(num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    logger.warning(
        "talking-heads attention with %d heads of %d channels in %s runs the Python path on "
        "CUDA: the Triton kernels take up to %d heads of up to %d channels in fp32/fp16/bf16%s",
        num_heads,
        head_dim,
        dtype,
        triton_talking_heads.MAX_HEADS,
        triton_talking_heads.MAX_HEAD_DIM,
        "" if triton_talking_heads.AVAILABLE else " (and Triton is not installed)",
    )


@torch.compiler.assume_constant_result
def _native_available() -> bool:
    """:func:`cait.kernels.native.available`, which a compiler calls once while tracing
    (it builds the kernel and holds a lock: not for tracing into)."""
    return native.available()


def _heads_bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``out[h] = a[h] @ b[h]`` for every head of head-major ``(H, B, X, Y)`` operands.

    In eager mode each ``a[h]`` and ``b[h]`` is a batch of matrices with one batch stride,
    which the batched product reads in place even when it is a strided view into ``qkv``,
    writing into ``out`` (allocated when not given; it may be a strided view too). Under
    ``torch.compile`` it is a plain ``matmul``, copied into ``out`` when one is given
    (``out=`` does not survive functionalisation; the compiler picks layouts).
    """
    if _compiling():
        result = torch.matmul(a, b)
        return result if out is None else out.copy_(result)
    if out is None:
        out = a.new_empty(a.shape[:-1] + b.shape[-1:])
    for h in range(out.shape[0]):
        torch.bmm(a[h], b[h], out=out[h])
    return out


def _mix(weight: Tensor, t: Tensor, out: Tensor | None = None) -> Tensor:
    """Head mixing on a contiguous head-major tensor: ``out[g] = sum_h weight[g, h] t[h]``."""
    H = t.shape[0]
    if out is None or _compiling():
        return torch.mm(weight, t.view(H, -1)).view(t.shape)
    torch.mm(weight, t.view(H, -1), out=out.view(H, -1))
    return out


def _softmax(z: Tensor, out: Tensor | None = None) -> Tensor:
    """Softmax over keys, accumulated in fp32 for fp16/bf16 and returned in their dtype.

    CUDA's softmax kernels already accumulate fp16/bf16 inputs in fp32 and round once on
    output, so there the input goes in as it is; elsewhere it is converted to fp32 first
    (one extra pass over the attention tensor, and an fp32 copy of it).
    """
    if z.dtype in (torch.float16, torch.bfloat16) and z.device.type != "cuda":
        return z.softmax(dim=-1, dtype=torch.float32).to(z.dtype)
    if out is None or _compiling():
        return z.softmax(dim=-1)
    return torch.ops.aten._softmax.out(z, -1, False, out=out)


def _softmax_backward(grad: Tensor, probs: Tensor, out: Tensor | None = None) -> Tensor:
    if out is None or _compiling():
        return torch.ops.aten._softmax_backward_data(grad, probs, -1, probs.dtype)
    return torch.ops.aten._softmax_backward_data.out(grad, probs, -1, probs.dtype, grad_input=out)


def _split(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N, 3C)`` -> ``q, k, v``, each a head-major ``(H, B, N, hd)`` view (no copy)."""
    B, N, C3 = qkv.shape
    qkv = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads))  # (B, N, 3, H, hd)
    return qkv.permute(2, 3, 0, 1, 4).unbind(0)


class _Scratch:
    """Buffers reused by every chunk a worker runs, so that each chunk's temporaries land
    in the memory (and the cache) its previous chunk used.

    Allocating them afresh per chunk costs more than the arithmetic on the CPU: blocks of a
    few MB go back to the operating system when freed, and the next allocation page-faults
    on first touch. ``get(i, shape)`` returns a contiguous view of buffer ``i``, allocated on
    its first use (a step that keeps its result in a new tensor never asks for one); a
    smaller last chunk takes the start of the same memory. Under ``torch.compile`` there are
    no buffers (``get`` returns ``None`` and every step allocates its own result).
    """

    def __init__(self, like: Tensor, count: int, numel: int) -> None:
        self.like, self.numel = like, numel
        self.buffers: list[Tensor | None] = [None] * (0 if _compiling() else count)

    def get(self, i: int, shape: tuple[int, ...]) -> Tensor | None:
        if len(self.buffers) == 0:
            return None
        buffer = self.buffers[i]
        if buffer is None:
            buffer = self.buffers[i] = self.like.new_empty(self.numel)
        return buffer[: math.prod(shape)].view(shape)


def _chunks(batch: int, chunk: int | None) -> list[slice]:
    """The batch in slices of ``chunk`` images; ``None`` is the whole batch as one slice,
    with no Python loop over its size (which ``torch.export`` and ``torch.compile`` may leave
    symbolic)."""
    if chunk is None:
        return [slice(0, batch)]
    return [slice(lo, min(lo + chunk, batch)) for lo in range(0, batch, chunk)]


def _map_chunks(
    body: Callable[[T, _Scratch], R], items: list[T], workers: int, scratch: Callable[[], _Scratch]
) -> list[R]:
    """``[body(item, buffers) for item in items]``, shared between ``workers`` CPU workers.

    Each worker makes its own scratch buffers with ``scratch()`` and takes the next item
    until none is left, so a worker whose CPU is busier does fewer. The results come back
    in item order whichever worker made them, which keeps every sum over them in a fixed
    order (bitwise reproducible training).
    """
    results: list[R | None] = [None] * len(items)
    next_index = itertools.count()  # next() on a count is atomic under the GIL

    def work() -> None:
        buffers = scratch()
        while (i := next(next_index)) < len(items):
            results[i] = body(items[i], buffers)

    n = min(workers, len(items))
    if n == 1:  # one worker, this thread: a plain loop (all a compiler sees)
        buffers = scratch()
        return [body(item, buffers) for item in items]
    run_on_cpu_workers([work] * n)
    return results  # type: ignore[return-value]


def _forward(
    qkv: Tensor,
    w_l: Tensor,
    w_w: Tensor,
    b_w: Tensor,
    num_heads: int,
    chunk: int | None,
    workers: int,
    keep: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The forward pass over the batch, chunk by chunk: ``(out, probabilities, logits)``.

    The chunks are shared between ``workers`` CPU workers (:func:`_map_chunks`).
    With ``keep`` each chunk's probabilities and raw logits are new tensors, returned for
    the backward pass; without (inference, or ``recompute``) they live in scratch buffers
    and the lists are empty.
    """
    H = num_heads
    q, k, v = _split(qkv, H)  # (H, B, N, hd) views
    _, B, N, hd = q.shape
    bias = b_w[:, None, None] * v.sum(dim=2)  # (H, B, hd): proj_w's bias term
    out = qkv.new_empty(B, N, H, hd)

    def run(sl: slice, scratch: _Scratch) -> tuple[Tensor, Tensor] | None:
        shape = (H, sl.stop - sl.start, N, N)
        logits = _heads_bmm(
            q[:, sl], k[:, sl].transpose(2, 3), None if keep else scratch.get(0, shape)
        )
        probs = _softmax(
            _mix(w_l, logits, scratch.get(1, shape)), None if keep else scratch.get(2, shape)
        )
        weights = _mix(w_w, probs, scratch.get(1, shape))
        ctx_heads = _heads_bmm(weights, v[:, sl], scratch.get(3, shape[:3] + (hd,)))
        # token-major (b, N, H, hd) with proj_w's bias term, written into this chunk's rows
        token_major, chunk_bias = ctx_heads.permute(1, 2, 0, 3), bias[:, sl].permute(1, 0, 2)
        if _compiling():
            out[sl] = token_major + chunk_bias[:, None]
        else:
            torch.add(token_major, chunk_bias[:, None], out=out[sl])
        return (probs, logits) if keep else None

    chunks = _chunks(B, chunk)
    # logits, mixed logits then mixed weights, probabilities, and the heads' context
    b = chunks[0].stop
    kept = _map_chunks(run, chunks, workers, lambda: _Scratch(qkv, 4, H * b * N * max(N, hd)))
    probs = [pair[0] for pair in kept if pair is not None]
    logits = [pair[1] for pair in kept if pair is not None]
    return out.view(B, N, H * hd), probs, logits


def _backward(
    qkv: Tensor,
    w_l: Tensor,
    w_w: Tensor,
    g_out: Tensor,
    probs_kept: list[Tensor],
    logits_kept: list[Tensor],
    chunk: int | None,
    workers: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward pass over the batch, chunk by chunk: ``(g_qkv (B, N, 3, H, hd), g_w_l,
    g_w_w)`` without the terms of ``proj_w``'s bias. ``g_out`` is head-major
    ``(H, B, N, hd)``; the kept lists are :func:`_forward`'s, empty with ``recompute``."""
    H = w_l.shape[0]
    q, k, v = _split(qkv, H)  # (H, B, N, hd) views
    _, B, N, hd = q.shape
    chunks = _chunks(B, chunk)
    g_qkv = qkv.new_empty(B, N, 3, H, hd)
    g_q, g_k, g_v = g_qkv.permute(2, 3, 0, 1, 4).unbind(0)  # (H, B, N, hd) views

    def run(
        item: tuple[slice, Tensor | None, Tensor | None], scratch: _Scratch
    ) -> tuple[Tensor, Tensor]:
        """One chunk's input gradients, in place; its share of the mixing weights'."""
        sl, probs, logits = item
        shape = (H, sl.stop - sl.start, N, N)
        q_, k_, v_, g_out_ = q[:, sl], k[:, sl], v[:, sl], g_out[:, sl]
        if probs is None:
            logits = _heads_bmm(q_, k_.transpose(2, 3), scratch.get(2, shape))
            probs = _softmax(_mix(w_l, logits, scratch.get(0, shape)), scratch.get(3, shape))
        weights = _mix(w_w, probs, scratch.get(0, shape))  # recomputed, without bias
        _heads_bmm(weights.transpose(2, 3), g_out_, g_v[:, sl])
        g_weights = _heads_bmm(g_out_, v_.transpose(2, 3), scratch.get(0, shape))
        g_w_w = torch.mm(g_weights.view(H, -1), probs.view(H, -1).t())
        g_attn = _mix(w_w.t(), g_weights, scratch.get(1, shape))
        g_z = _softmax_backward(g_attn, probs, scratch.get(0, shape))
        if logits is None:
            logits = _heads_bmm(q_, k_.transpose(2, 3), scratch.get(1, shape))
        g_w_l = torch.mm(g_z.view(H, -1), logits.view(H, -1).t())
        g_logits = _mix(w_l.t(), g_z, scratch.get(1, shape))
        _heads_bmm(g_logits, k_, g_q[:, sl])
        _heads_bmm(g_logits.transpose(2, 3), q_, g_k[:, sl])
        return g_w_l, g_w_w

    # weights, then their gradient, then the softmax's; the probabilities' gradient, then
    # the logits'; with ``recompute`` also the logits and the probabilities
    # (length tests rather than truthiness: Dynamo in torch 2.11 cannot trace `not` on the
    # tuples these are under torch.compile)
    recompute = len(probs_kept) == 0
    count = 4 if recompute else 2
    missing = [None] * len(chunks)
    work = list(
        zip(
            chunks,
            missing if recompute else probs_kept,
            missing if recompute else logits_kept,
            strict=True,
        )
    )
    b = chunks[0].stop
    parts = _map_chunks(run, work, workers, lambda: _Scratch(qkv, count, H * b * N * N))
    g_w_l = sum(g for g, _ in parts)  # in chunk order: reproducible
    g_w_w = sum(g for _, g in parts)
    return g_qkv, g_w_l, g_w_w  # type: ignore[return-value]


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
        chunk: int | None,
        workers: int,
    ) -> Tensor:
        dtype = qkv.dtype
        with _autocast_off(qkv.device.type):
            w_l_, w_w_, b_w_ = w_l.to(dtype), w_w.to(dtype), b_w.to(dtype)
            out, probs, logits = _forward(
                qkv, w_l_, w_w_, b_w_, num_heads, chunk, workers, not recompute
            )
        ctx.num_heads, ctx.chunk, ctx.workers, ctx.recompute = num_heads, chunk, workers, recompute
        ctx.param_dtypes = (w_l.dtype, b_l.dtype, w_w.dtype, b_w.dtype)
        ctx.save_for_backward(qkv, w_l_, w_w_, b_w_, *probs, *logits)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qkv, w_l, w_w, b_w, *kept = ctx.saved_tensors
        H = ctx.num_heads
        with _autocast_off(qkv.device.type):
            B, N, C3 = qkv.shape
            hd = C3 // (3 * H)
            g_out = grad_out.to(qkv.dtype).reshape(B, N, H, hd).permute(2, 0, 1, 3)  # (H,B,N,hd)
            # with recompute nothing was kept: the logits and probabilities are recomputed
            probs, logits = kept[: len(kept) // 2], kept[len(kept) // 2 :]
            g_qkv, g_w_l, g_w_w = _backward(
                qkv, w_l, w_w, g_out, probs, logits, ctx.chunk, ctx.workers
            )
            # proj_w's bias term: b_g * sum_j v_g[j] added to every output row of head g
            v = _split(qkv, H)[2]
            g_out_sum = g_out.sum(dim=2)  # (H, B, hd)
            g_v = g_qkv[:, :, 2].permute(2, 0, 1, 3)  # (H, B, N, hd) view
            g_v += (b_w[:, None, None] * g_out_sum)[:, :, None]
            g_b_w = (g_out_sum * v.sum(dim=2)).sum(dim=(1, 2))
        dt_wl, dt_bl, dt_ww, dt_bw = ctx.param_dtypes
        # proj_l's bias shifts every logit of a row by the same amount: zero gradient
        g_b_l = torch.zeros(H, dtype=dt_bl, device=qkv.device)
        return (
            g_qkv.view(B, N, 3 * H * hd),
            g_w_l.to(dt_wl),
            g_b_l,
            g_w_w.to(dt_ww),
            g_b_w.to(dt_bw),
            None,
            None,
            None,
            None,
        )


def _use_native(qkv: Tensor, use_native: bool | None, exporting: bool) -> bool:
    """Whether the C++ kernel runs: by default on CPU tensors where it could be built (not
    under ``torch.export``); ``use_native=True`` elsewhere is an error."""
    on_cpu = qkv.device.type == "cpu"
    if use_native is None:
        return on_cpu and not exporting and _native_available()
    if use_native and (not on_cpu or exporting):
        raise ValueError(
            f"use_native=True runs on CPU tensors, not on {qkv.device.type}"
            + (" under torch.export" if exporting else "")
        )
    if use_native and not _native_available():
        raise RuntimeError(
            "use_native=True, but cait's C++ kernels could not be built "
            "(cait.kernels.native logged why when it tried)"
        )
    return use_native


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
    workers: int | None = None,
    use_native: bool | None = None,
) -> Tensor:
    """Talking-heads attention from the ``qkv`` projection, ``(B, N, 3C) -> (B, N, C)``.

    ``softmax(proj_l(scale * q k^T))`` mixed by ``proj_w``, then ``@ v``, heads concatenated
    (the input of the output projection). ``w_l, b_l`` are ``proj_l``'s weight and bias,
    ``w_w, b_w`` ``proj_w``'s. No attention dropout. With ``recompute`` the backward pass
    recomputes the logits and probabilities instead of keeping them.

    On the CPU it runs by default in the C++ kernel (``use_native``;
    :mod:`cait.kernels.native`), one image at a time on torch's intra-op threads, as the op
    ``cait::talking_heads_cpu`` (:mod:`cait.kernels.ops`), which ``torch.compile`` keeps as
    one node. On CUDA it runs by default in the Triton kernels, which write nothing of size
    ``(B, H, N, N)`` and keep only each row's log-sum-exp for the backward pass (so
    ``recompute`` changes nothing there), as the op ``cait::talking_heads_fused``
    (:mod:`cait.kernels.triton_talking_heads`; shapes they do not take are logged once and
    run in Python). With ``use_native=False`` (on any device), under ``torch.export``
    (whose programs hold only standard ops), on other devices and where the kernel could not
    be built, it runs in Python: the batch in chunks of about ``chunk_bytes`` of attention
    tensor (default :data:`CPU_CHUNK_BYTES` on the CPU, the whole batch elsewhere; ``0`` for
    the whole batch), on the CPU shared between ``workers`` threads of one intra-op thread
    each (default: torch's thread count; :func:`cait.kernels.cpu_workers.run_on_cpu_workers`),
    with smaller chunks when there are fewer than ``workers`` of them; elsewhere one.
    Under ``torch.compile`` and ``torch.export`` the whole batch is one chunk and no Python
    code loops over its size, so the batch dimension can stay symbolic (an exported program
    or a compiled graph with a dynamic batch).
    """
    B, N, _ = qkv.shape
    on_cpu = qkv.device.type == "cpu"
    exporting = torch.compiler.is_exporting()
    fused = use_native is None and qkv.device.type == "cuda" and not exporting
    use_native = _use_native(qkv, use_native, exporting)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if fused:
        if _fused_supported(num_heads, qkv.shape[-1] // (3 * num_heads), qkv.dtype):
            with torch.autocast("cuda", enabled=False):  # fp32 weights, qkv as it is
                weights = ((w_l * scale).float(), b_l.float(), w_w.float(), b_w.float())
                return ops.talking_heads_fused(qkv, *weights, num_heads)[0]
    if use_native:
        params = (qkv, w_l, b_l, w_w, b_w)
        keep = not recompute and torch.is_grad_enabled() and any(t.requires_grad for t in params)
        with torch.autocast("cpu", enabled=False):  # the op's weights in the dtype of qkv
            dt = qkv.dtype
            weights = ((w_l * scale).to(dt), b_l.to(dt), w_w.to(dt), b_w.to(dt))
            return ops.talking_heads_cpu(qkv, *weights, num_heads, keep)[0]
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if on_cpu and not _compiling() else 0
    if workers is None:
        workers = torch.get_num_threads() if on_cpu and not _compiling() else 1
    chunk: int | None
    if chunk_bytes > 0:
        per_image = num_heads * N * N * qkv.element_size()
        chunk = min(max(1, chunk_bytes // per_image), math.ceil(B / workers))
    elif workers > 1:
        chunk = math.ceil(B / workers)
    else:  # the whole batch as one chunk, its size never looped over (it may be symbolic)
        chunk = None
    w_l = w_l * scale
    params = (w_l, b_l, w_w, b_w)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, *params)):
        return _TalkingHeads.apply(qkv, *params, num_heads, recompute, chunk, workers)
    with _autocast_off(qkv.device.type):  # as in _TalkingHeads.forward
        w_l, w_w, b_w = w_l.to(qkv.dtype), w_w.to(qkv.dtype), b_w.to(qkv.dtype)
        return _forward(qkv, w_l, w_w, b_w, num_heads, chunk, workers, keep=False)[0]
