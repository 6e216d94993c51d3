"""The attention paths on a CUDA device: what ``tests/test_attention.py`` checks on the CPU,
where the Python path runs the whole batch as one chunk (the C++ kernel is CPU-only).

Marked ``gpu`` and skipped without a CUDA device; ``make test-gpu`` runs them, and
``examples/gpu_checks.sh`` runs them before its timings.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from test_talking_heads import FAST_IMPLS, TOL, _attention_pair, _core_args, _grads

import cait
from cait.bench import benchmark, precision_agreement
from cait.kernels.talking_heads import talking_heads_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 products in full precision (no TF32), as ``cait.runtime.setup`` sets them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_fast_talking_heads_equal_plain_on_cuda(impl):
    plain, fast = (m.to(CUDA) for m in _attention_pair(impl))
    x = torch.randn(3, 7, 24, device=CUDA)
    ref_out, ref_grads = _grads(plain, x)
    out, grads = _grads(fast, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], ref_out, **TOL)
    for name, g in ref_grads.items():
        if name == "proj_l.bias":  # exactly 0 in the fast paths, rounding noise in plain
            assert torch.all(grads[name] == 0) and g.abs().max() < 1e-5
            continue
        torch.testing.assert_close(grads[name], g, **TOL, msg=name)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_released_config_fast_equals_plain_on_cuda(impl):
    """cait_xxs24_224 (4 blocks) with random weights at batch 8: logits within 1e-5, and
    gradients within 1e-4 of each tensor's largest value: the mixing weights' gradients
    are sums over B * N * N = 307k terms that cancel, which cuBLAS adds in its own order,
    so plain and fast alike can stray from the exact value by about 1e-5 in fp32."""
    plain = randomize_(cait.create_model("cait_xxs24_224", attn_impl="plain", depth=4))
    fast = cait.create_model("cait_xxs24_224", attn_impl=impl, depth=4)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 224, 224).to(CUDA)
    grads = []
    for model in (plain.to(CUDA).train(), fast.to(CUDA).train()):
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    with torch.no_grad():
        ref = plain.eval()(x)
        scale = ref.abs().max()
        torch.testing.assert_close(fast.eval()(x) / scale, ref / scale, **TOL)
    for name, g in grads[0].items():
        if not name.endswith("proj_l.bias"):
            g_scale = g.abs().max().clamp_min(1e-3)
            torch.testing.assert_close(
                grads[1][name] / g_scale, g / g_scale, atol=1e-4, rtol=1e-5, msg=name
            )


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_core_is_close_to_fp32_on_cuda(impl, dtype):
    """The core in bf16/fp16 (softmax straight on the low-precision logits on CUDA) against
    fp32: outputs and gradients within 4% (bf16, 8 bits of mantissa) or 1% (fp16, 11) of
    the largest value; the mixing weights' gradients, long sums of rounded products, come
    closest to the bound."""
    qkv, heads, w_l, b_l, w_w, b_w, scale = _core_args(impl)
    params = [p.detach().to(CUDA).requires_grad_() for p in (w_l, b_l, w_w, b_w)]
    g_out = torch.randn(5, 7, 24, device=CUDA)
    results = []
    for dt in (torch.float32, dtype):
        x = qkv.detach().to(CUDA, dt).requires_grad_()
        out = talking_heads_attention(x, heads, *params, scale, recompute=impl == "recompute")
        assert out.dtype == dt
        results.append([out, *torch.autograd.grad(out, [x, params[0], params[2]], g_out.to(dt))])
    bound = 4e-2 if dtype == torch.bfloat16 else 1e-2
    for ref, low in zip(*results, strict=True):
        assert (low.float() - ref.float()).abs().max() <= bound * ref.float().abs().max()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_inference_is_close_to_fp32_on_cuda(dtype):
    """Cast and autocast, as on the CPU (``test_bf16_inference_is_close_to_fp32...``)."""
    model = randomize_(cait.create_model("cait_digits_16")).eval().to(CUDA)
    x, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
    for autocast in (False, True):
        r = precision_agreement(model, x, y, dtype, autocast=autocast)
        assert r["max_abs_prob_diff"] < 0.05 and r["agreement"] >= 0.95, r


def _training_memory(impl: str) -> tuple[float, float]:
    """(MiB held from forward to backward, peak MiB of forward and backward) for an 8-block
    cait_s24_384 at batch 4 under bf16 autocast, above the weights and the batch."""
    torch.manual_seed(0)
    model = cait.create_model("cait_s24_384", attn_impl=impl, depth=8).to(CUDA).train()
    x = torch.randn(4, 3, 384, 384, device=CUDA)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return held / 2**20, peak / 2**20


def test_recompute_saves_training_memory_on_cuda():
    """N = 576, H = 8: one attention tensor per block is as large as the block's other
    saved activations, so keeping none of them (``recompute``) must show in the memory
    held for backward and in the peak, against ``plain`` (timm's computation)."""
    _training_memory("recompute")  # allocates cuBLAS's workspace, uncounted below
    plain_held, plain_peak = _training_memory("plain")
    fast_held, _ = _training_memory("fast")
    held, peak = _training_memory("recompute")
    assert held < fast_held < plain_held
    assert held <= 0.5 * plain_held, (held, plain_held)
    assert peak <= 0.7 * plain_peak, (peak, plain_peak)


def test_compiled_inference_and_training_on_cuda():
    torch._dynamo.reset()
    eager = randomize_(cait.create_model("cait_digits_16", attn_impl="plain")).to(CUDA)
    model = cait.create_model("cait_digits_16").to(CUDA)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(4, 3, 16, 16, device=CUDA), torch.tensor([0, 1, 2, 3], device=CUDA)
    for m in (eager, compiled):
        torch.nn.functional.cross_entropy(m.train()(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad():
        ref = eager.eval()(x)
        scale = ref.abs().max()
        torch.testing.assert_close(compiled.eval()(x) / scale, ref / scale, **TOL)


@pytest.mark.parametrize("train", [False, True])
def test_bench_compare_timm_on_cuda(train):
    r = benchmark(
        "cait_xxs24_224",
        batch_size=8,
        dtype="bf16",
        autocast=True,
        device="cuda",
        train=train,
        compare="timm",
        rounds=2,
        steps=1,
        warmup=1,
    )
    assert r.device.startswith("cuda") and r.top1_agreement == 1.0 and r.ratio > 0
    assert all(t.peak_mem_mib is not None and t.peak_mem_mib > 0 for t in r.timings)
