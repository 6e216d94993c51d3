"""The Triton kernels on the CPU, run by tests/kernels/test_triton_talking_heads.py in a
process of its own with ``TRITON_INTERPRET=1`` (Triton reads it when it is imported, and
torch imports Triton: the variable must be set before the process starts).

``python tests/kernels/triton_interpreter_check.py B,N,H,HD ...`` registers the fused ops'
implementations for CPU tensors, runs ``cait::talking_heads_fused`` forward and backward
(through its registered autograd) on random fp32 inputs of each shape, with biases large
enough that a mishandled one shows, and compares the output and every gradient with the
reference computation (the attention tensor laid out whole, as ``impl="plain"`` does) in
float64. Exits 1 with the worst relative error where one exceeds :data:`RTOL`; prints one
line per shape and tensor.
"""

from __future__ import annotations

import os
import sys

import torch

RTOL = 1e-4  # the fp32 bound, relative to each tensor's largest value


def reference(qkv, w_l, b_l, w_w, b_w, num_heads: int, scale: float) -> torch.Tensor:
    """Talking heads as the paper writes it: ``(B, N, 3C) -> (B, N, C)``."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    logits = scale * q @ k.transpose(-1, -2)  # (B, H, N, N)
    mixed = torch.einsum("bhij,gh->bgij", logits, w_l) + b_l[None, :, None, None]
    weights = torch.einsum("bhij,gh->bgij", mixed.softmax(-1), w_w) + b_w[None, :, None, None]
    return (weights @ v).transpose(1, 2).reshape(B, N, C3 // 3)


def check(B: int, N: int, H: int, hd: int) -> float:
    """The worst relative error of the output and the gradients at one shape."""
    from cait.kernels import ops

    g = torch.Generator().manual_seed(0)
    scale = hd**-0.5
    inputs = [
        torch.randn(B, N, 3 * H * hd, generator=g),
        torch.randn(H, H, generator=g),
        torch.randn(H, generator=g),
        torch.randn(H, H, generator=g) * 0.5,
        torch.randn(H, generator=g) * 0.5,
    ]
    g_out = torch.randn(B, N, H * hd, generator=g)
    results = []
    for dtype in (torch.float64, torch.float32):
        xs = [t.to(dtype).requires_grad_() for t in inputs]
        if dtype == torch.float64:
            out = reference(*xs, H, scale)
        else:
            out = ops.talking_heads_fused(xs[0], xs[1] * scale, *xs[2:], H)[0]
        results.append([out, *torch.autograd.grad(out, xs, g_out.to(dtype))])
    worst = 0.0
    names = ["out", "qkv", "proj_l.weight", "proj_l.bias", "proj_w.weight", "proj_w.bias"]
    for name, ref, got in zip(names, *results, strict=True):
        size = ref.abs().max().item()
        error = (got.double() - ref).abs().max().item() / max(size, 1e-12)
        if name == "proj_l.bias":  # exactly 0 in the fused path; rounding noise in float64
            error = got.abs().max().item()
        print(f"{(B, N, H, hd)} {name:<14} max |error| / max |value| = {error:.2e}")
        worst = max(worst, error)
    return worst


def main(shapes: list[tuple[int, ...]]) -> int:
    from cait.kernels import ops

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    ops.talking_heads_fused.register_kernel("cpu", ops._fused_forward)
    ops.talking_heads_fused_backward.register_kernel("cpu", ops._fused_backward_impl)
    worst = max(check(*shape) for shape in shapes)
    if worst > RTOL:
        print(f"FAILED: worst relative error {worst:.2e} > {RTOL:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main([tuple(int(n) for n in arg.split(",")) for arg in sys.argv[1:]]))
