"""The Triton kernels on the CPU, run by tests/kernels/test_triton_talking_heads.py in a
process of its own with ``TRITON_INTERPRET=1`` (Triton reads it when it is imported, and
torch imports Triton: the variable must be set before the process starts).

``python tests/kernels/triton_interpreter_check.py B,N,H,HD[,fp16] ...`` registers the
fused ops' implementations for CPU tensors, runs ``cait::talking_heads_fused`` forward and
backward (through its registered autograd) on random inputs of each shape (fp32, or fp16),
with biases large enough that a mishandled one shows, and compares the output and every
gradient with the reference computation (the attention tensor laid out whole, as
``impl="plain"`` does) in float64. Exits 1 where an error exceeds its bound
(:func:`check`); prints one line per shape and tensor.
"""

from __future__ import annotations

import os
import sys

import torch

RTOL = 1e-4  # the fp32 bound, relative to each tensor's largest value
# bf16 is left to the GPU tests: Triton's interpreter (3.8) computes bf16 products wrongly
# (a 16 x 16 tl.dot of bf16 tiles is off by 1e10), fp16 and fp32 rightly
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def reference(qkv, w_l, b_l, w_w, b_w, num_heads: int, scale: float) -> torch.Tensor:
    """Talking heads as the paper writes it: ``(B, N, 3C) -> (B, N, C)``."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    logits = scale * q @ k.transpose(-1, -2)  # (B, H, N, N)
    mixed = torch.einsum("bhij,gh->bgij", logits, w_l) + b_l[None, :, None, None]
    weights = torch.einsum("bhij,gh->bgij", mixed.softmax(-1), w_w) + b_w[None, :, None, None]
    return (weights @ v).transpose(1, 2).reshape(B, N, C3 // 3)


def check(B: int, N: int, H: int, hd: int, dtype: torch.dtype) -> bool:
    """Whether the output and every gradient at one shape are within the bound: :data:`RTOL`
    in fp32; in fp16, twice the plain computation's own fp16 error (plus 1e-3), both
    against float64. Prints one line per tensor."""
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

    def grads(dt: torch.dtype, fused: bool) -> list[torch.Tensor]:
        # the fused op takes fp32 weights and qkv in its dtype; the reference all in `dt`
        xs = [t.to(dt if i == 0 or not fused else torch.float32) for i, t in enumerate(inputs)]
        xs = [t.requires_grad_() for t in xs]
        if fused:
            out = ops.talking_heads_fused(xs[0], xs[1] * scale, *xs[2:], H)[0]
        else:
            out = reference(*xs, H, scale)
        return [out, *torch.autograd.grad(out, xs, g_out.to(out.dtype))]

    exact, fused = grads(torch.float64, False), grads(dtype, True)
    plain = grads(dtype, False) if dtype != torch.float32 else None
    ok = True
    names = ["out", "qkv", "proj_l.weight", "proj_l.bias", "proj_w.weight", "proj_w.bias"]
    for i, name in enumerate(names):
        size = max(exact[i].abs().max().item(), 1e-12)
        error = (fused[i].double() - exact[i]).abs().max().item() / size
        bound = RTOL
        if plain is not None:
            bound = 2 * (plain[i].double() - exact[i]).abs().max().item() / size + 1e-3
        if name == "proj_l.bias":  # exactly 0 in the fused path; rounding noise elsewhere
            error, bound = fused[i].abs().max().item(), 0.0
        print(f"{(B, N, H, hd)} {dtype} {name:<14} |error| / max |value| = {error:.2e} "
              f"(bound {bound:.1e})")  # fmt: skip
        ok = ok and error <= bound
    return ok


def main(cases: list[str]) -> int:
    from cait.kernels import ops

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    ops.talking_heads_fused.register_kernel("cpu", ops._fused_forward)
    ops.talking_heads_fused_backward.register_kernel("cpu", ops._fused_backward_impl)
    results = []
    for case in cases:
        *shape, dtype = case.split(",") if case.count(",") == 4 else [*case.split(","), "fp32"]
        results.append(check(*map(int, shape), DTYPES[dtype]))
    if not all(results):
        print("FAILED: an error above its bound")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
