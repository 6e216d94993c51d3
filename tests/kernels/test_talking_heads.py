"""Fast attention paths against the plain one: outputs and gradients in fp32, saved memory,
low-precision agreement, torch.compile without graph breaks.

Checks that hold on any device take a ``device`` parameter (:data:`DEVICES`) whose CUDA case
is marked ``gpu`` and skipped without a CUDA device; there the fused Triton kernels run by
default (tests/kernels/test_triton_talking_heads.py checks them further), and the Python
path with ``use_native=False``, the whole batch as one chunk by default. Checks of CUDA
alone (the core in bf16/fp16, recompute's memory, compiled training) are marked ``gpu``
too. ``make test-gpu`` runs every ``gpu`` case, and ``TESTS=1 examples/gpu_checks.sh``
runs them before its timings.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import CUDA_CASE, DEVICES, NEEDS_CUDA, randomize_

import cait
from cait.bench.precision import precision_agreement
from cait.kernels.talking_heads import talking_heads_attention
from cait.models.layers import TalkingHeadAttention

CUDA = torch.device("cuda")

FAST_IMPLS = ["fast", "recompute"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _attention_pair(impl: str, dim: int = 24, heads: int = 3) -> tuple:
    plain = TalkingHeadAttention(dim, heads, impl="plain")
    randomize_(plain)
    with torch.no_grad():  # biases large enough that a mishandled one shows
        plain.proj_l.bias.normal_(0, 1.0)
        plain.proj_w.bias.normal_(0, 0.5)
    fast = TalkingHeadAttention(dim, heads, impl=impl)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = module(x)[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(x.device))
    return out, {"input": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize(
    "path",
    [None, 0, 1, 2 * 3 * 7 * 7 * 4, "default"],
    ids=["auto", "python-whole", "python-per-image", "python-2+1", "python-default"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_fast_talking_heads_equal_plain(device, impl, path, monkeypatch):
    """The path chosen by default (the C++ kernel on the CPU, the fused Triton kernels on
    CUDA), and the Python path with the whole batch, one image per chunk, chunks of
    2 and 1, and its default chunks (the whole batch on CUDA)."""
    import cait.models.layers

    if path is not None:

        def python(*args, **kwargs):
            chunks = {} if path == "default" else dict(chunk_bytes=path)
            return talking_heads_attention(*args, **kwargs, **chunks, use_native=False)

        monkeypatch.setattr(cait.models.layers, "talking_heads_attention", python)
    plain, fast = (m.to(device) for m in _attention_pair(impl))
    x = torch.randn(3, 7, 24, device=device)
    ref_out, ref_grads = _grads(plain, x)
    out, grads = _grads(fast, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    with torch.no_grad():  # inference keeps nothing for backward: a path of its own
        torch.testing.assert_close(fast(x)[0], ref_out, **TOL)
    for name, g in ref_grads.items():
        if name == "proj_l.bias":
            # exactly 0 in the fast paths; rounding noise in the plain one
            assert torch.all(grads[name] == 0) and g.abs().max() < 1e-5
            continue
        torch.testing.assert_close(grads[name], g, **TOL, msg=name)


def _core_args(impl: str, batch: int = 5) -> tuple:
    """Arguments of :func:`talking_heads_attention` for 3 heads of 8 over 7 tokens."""
    _, fast = _attention_pair(impl)
    weights = (fast.proj_l.weight, fast.proj_l.bias, fast.proj_w.weight, fast.proj_w.bias)
    return (torch.randn(batch, 7, 72, requires_grad=True), 3, *weights, fast.scale)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_kernel_equals_python_path(impl, threads):
    """The C++ kernel against the Python path: outputs and gradients in fp32 (with 1 and 2
    intra-op threads, bitwise the same for both counts), in inference mode, and in bf16."""
    import cait.kernels.native

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    assert cait.kernels.native.available(), "the C++ kernel did not build (see the warning logged)"
    args = _core_args(impl)
    qkv, params = args[0], [args[2], args[4], args[5]]  # proj_l.weight, proj_w's
    recompute = impl == "recompute"
    g_out = torch.randn(5, 7, 24)
    results = {}
    for native, n in [(False, 1), (True, threads), (True, 3 - threads)]:
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            out = talking_heads_attention(*args, recompute=recompute, use_native=native)
            grads = torch.autograd.grad(out, [qkv, *params], g_out)
        finally:
            torch.set_num_threads(previous)
        results[native, n] = (out, *grads)
    for ours, ref in zip(results[True, threads], results[False, 1], strict=True):
        torch.testing.assert_close(ours, ref, **TOL)
    for a, b in zip(results[True, 1], results[True, 2], strict=True):
        assert torch.equal(a, b)  # per-image parts of the weight gradients, summed in order
    with torch.inference_mode():  # the threads write into the caller's inference tensors
        out = talking_heads_attention(*args, use_native=True)
    torch.testing.assert_close(out, results[False, 1][0], **TOL)
    # bf16, where the kernel mixes and normalises in fp32: within 2% of the largest value
    bf16_qkv = args[0].detach().bfloat16().requires_grad_()
    bf16 = [(bf16_qkv, *args[1:])]
    with torch.no_grad():
        bf16.append(talking_heads_attention(*bf16[0], use_native=True))
        bf16.append(talking_heads_attention(*bf16[0], use_native=False))
    for native in (True, False):  # training keeps the probabilities in bf16
        out = talking_heads_attention(*bf16[0], recompute=recompute, use_native=native)
        bf16.extend([out, *torch.autograd.grad(out, [bf16_qkv, *params], g_out.bfloat16())])
    assert bf16[1].dtype == torch.bfloat16
    for ours, ref in [(bf16[1], bf16[2]), *zip(bf16[3:8], bf16[8:13], strict=True)]:
        assert (ours.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()


def test_python_path_when_the_kernel_is_missing(monkeypatch, caplog):
    """A failed build warns and leaves the Python path; asking for the kernel then fails."""
    import torch.utils.cpp_extension

    import cait.kernels.native

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    with caplog.at_level("WARNING", logger="cait.kernels.native"):
        assert cait.kernels.native._load() is False
    assert "no C++ compiler found" in caplog.text and "CAIT_NATIVE=0" in caplog.text
    monkeypatch.setenv("CAIT_NATIVE", "0")
    assert cait.kernels.native._load() is False
    monkeypatch.setattr(cait.kernels.native, "available", lambda: False)
    args = _core_args("fast")
    ref = talking_heads_attention(*args, use_native=False)
    torch.testing.assert_close(talking_heads_attention(*args), ref)
    with pytest.raises(RuntimeError, match="use_native=True"):
        talking_heads_attention(*args, use_native=True)
    with pytest.raises(ValueError, match="CPU tensors"):  # checked before the build
        talking_heads_attention(args[0].to("meta"), *args[1:], use_native=True)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("chunk_bytes", [1, None], ids=["per-image", "default"])
def test_cpu_workers_equal_one_thread(impl, workers, chunk_bytes):
    """The chunks shared between 1-3 single-threaded workers (5 images: groups of 2+2+1
    per-image chunks, or chunks of 2, 2 and 1 by default) against the whole batch in the
    calling thread, with and without gradients."""
    _, fast = _attention_pair(impl)
    qkv = torch.randn(5, 7, 72, requires_grad=True)
    args = (
        qkv,
        3,
        fast.proj_l.weight,
        fast.proj_l.bias,
        fast.proj_w.weight,
        fast.proj_w.bias,
        fast.scale,
    )
    kwargs = dict(
        recompute=impl == "recompute", chunk_bytes=chunk_bytes, workers=workers, use_native=False
    )
    out = talking_heads_attention(*args, **kwargs)
    ref = talking_heads_attention(
        *args, recompute=kwargs["recompute"], chunk_bytes=0, workers=1, use_native=False
    )
    torch.testing.assert_close(out, ref, **TOL)
    params = [qkv, fast.proj_l.weight, fast.proj_w.weight, fast.proj_w.bias]
    g_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, params, g_out)
    ref_grads = torch.autograd.grad(ref, params, g_out)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref_g, **TOL)
    with torch.inference_mode():  # the workers write into the caller's inference tensors
        torch.testing.assert_close(talking_heads_attention(*args, **kwargs), ref, **TOL)
    with pytest.raises(ValueError, match="workers"):
        talking_heads_attention(*args, workers=0)


def test_attention_map_requests_use_the_plain_path():
    plain, fast = _attention_pair("fast")
    x = torch.randn(2, 5, 24)
    out, attn = fast(x, return_attn=True)
    ref_out, ref_attn = plain(x, return_attn=True)
    assert attn is not None and attn.shape == (2, 3, 5, 5)
    torch.testing.assert_close(attn, ref_attn)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert fast(x)[1] is None


def test_attention_dropout_falls_back_to_plain_and_recompute_refuses_it():
    attn = TalkingHeadAttention(24, 3, attn_drop=0.5, impl="fast").train()
    x = torch.randn(2, 5, 24)
    assert not torch.equal(attn(x)[0], attn(x)[0])  # dropout is applied
    with pytest.raises(ValueError, match="attn_drop"):
        TalkingHeadAttention(24, 3, attn_drop=0.1, impl="recompute")
    with pytest.raises(ValueError, match="attn_drop_rate"):
        cait.CaiTConfig(attn_impl="recompute", attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="attn_impl"):
        cait.CaiTConfig(attn_impl="flash")


def _saved_attention_tensors(impl: str) -> float:
    """How many (B, H, N, N) tensors' worth of attention one block keeps for its backward."""
    B, N, C, H = 2, 9, 24, 3
    _, block = _attention_pair(impl, C, H)
    kept = []

    def pack(t):
        if t.numel() % (H * N * N) == 0:  # whole, a chunk of images, or a permuted copy
            kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(torch.randn(B, N, C, requires_grad=True))
    return sum(kept) / (B * H * N * N)


def test_recompute_keeps_no_attention_tensor():
    assert _saved_attention_tensors("plain") >= 3
    assert _saved_attention_tensors("fast") == 2
    assert _saved_attention_tensors("recompute") == 0


# Batch size and gradient tolerance of the released-config check on each device. On CUDA,
# at batch 8 the mixing weights' gradients are sums over B * N * N = 307k terms that cancel,
# which cuBLAS adds in its own order, so plain and fast alike can stray from the exact value
# by about 1e-5 in fp32: gradients are held to 1e-4 there.
RELEASED_CONFIG_CHECK = {"cpu": (2, 1e-5), "cuda": (8, 1e-4)}


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_released_config_fast_equals_plain(device, impl):
    """cait_xxs24_224 (4 blocks) with random weights: logits within 1e-5, and gradients
    within :data:`RELEASED_CONFIG_CHECK`'s tolerance of each tensor's largest value."""
    batch, grad_atol = RELEASED_CONFIG_CHECK[device]
    torch.manual_seed(0)
    plain = randomize_(cait.create_model("cait_xxs24_224", attn_impl="plain", depth=4))
    fast = cait.create_model("cait_xxs24_224", attn_impl=impl, depth=4)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 3, 224, 224).to(device)
    grads = []
    for model in (plain.to(device).train(), fast.to(device).train()):
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
                grads[1][name] / g_scale, g / g_scale, atol=grad_atol, rtol=1e-5, msg=name
            )


def test_intermediates_match_fast_forward():
    model = randomize_(cait.create_model("cait_digits_16")).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_trace(x).logits, model(x), **TOL)


def test_old_config_dicts_load_with_the_default_impl():
    data = cait.get_variant("cait_digits_16").config.to_dict()
    del data["attn_impl"]
    assert cait.CaiTConfig.from_dict(data).attn_impl == "fast"


def _train_digits(steps: int = 150) -> tuple[cait.CaiT, torch.Tensor, torch.Tensor]:
    """cait_digits_16 trained briefly on the digits; returns it with the val images."""
    from cait.data import DigitsDataset

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = DigitsDataset(split)
        x = torch.tensor(ds.images, dtype=torch.float32)[:, None] / 255.0  # (M, 1, 8, 8)
        x = torch.nn.functional.interpolate(x, size=16, mode="bilinear").expand(-1, 3, -1, -1)
        return (x - 0.5) / 0.5, torch.tensor(ds.targets)

    torch.manual_seed(0)
    model = cait.create_model("cait_digits_16")
    x, y = tensors("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), *tensors("val")


@pytest.mark.parametrize(
    "device, dtype",
    [
        pytest.param("cpu", "bf16", id="cpu-bf16"),
        pytest.param("cuda", "bf16", id="cuda-bf16", marks=CUDA_CASE),
        pytest.param("cuda", "fp16", id="cuda-fp16", marks=CUDA_CASE),
    ],
)
def test_low_precision_inference_is_close_to_fp32_with_random_weights(device, dtype):
    """Cast and autocast. Every branch counts (randomised weights); random models have
    near-tied classes, so the bound on agreement is looser than for a trained model (below,
    and the demo model in docs/BENCHMARKS.md)."""
    model = randomize_(cait.create_model("cait_digits_16")).eval().to(device)
    x, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
    for autocast in (False, True):
        r = precision_agreement(model, x, y, dtype, autocast=autocast)
        assert r["max_abs_prob_diff"] < 0.05 and r["agreement"] >= 0.95, r
    assert next(model.parameters()).dtype == torch.float32  # the model is left as it was


@pytest.mark.slow
def test_bf16_inference_agrees_with_fp32_on_a_trained_model():
    model, x, y = _train_digits()
    r = precision_agreement(model, x, y, "bf16", batch_size=128)
    assert r["top1_fp32"] > 0.8, "the briefly trained model should have learned something"
    assert r["agreement"] >= 0.99, r
    assert next(model.parameters()).dtype == torch.float32  # the model is left as it was


def test_forward_and_training_trace_without_graph_breaks():
    model = cait.create_model("cait_digits_16")
    x = torch.randn(2, 3, 16, 16)
    for train in (False, True):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.train(train))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_compiled_training_step_equals_eager(impl):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = randomize_(cait.create_model("cait_digits_16", attn_impl="plain"))
    model = cait.create_model("cait_digits_16", attn_impl=impl)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for m in (eager, compiled):
        torch.nn.functional.cross_entropy(m.train()(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), **TOL)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
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


@pytest.mark.gpu
@NEEDS_CUDA
def test_recompute_saves_training_memory_on_cuda():
    """N = 576, H = 8: one attention tensor per block is as large as the block's other
    saved activations, so keeping none of them (``recompute``) must show in the memory
    held for backward and in the peak, against ``plain`` (timm's computation)."""
    _training_memory("recompute")  # allocates cuBLAS's workspace, uncounted below
    plain_held, plain_peak = _training_memory("plain")
    fast_held, _ = _training_memory("fast")
    held, peak = _training_memory("recompute")
    # on CUDA `fast` runs the fused kernels too, which keep only the rows' log-sum-exp
    assert held <= fast_held < plain_held
    assert held <= 0.5 * plain_held, (held, plain_held)
    assert peak <= 0.7 * plain_peak, (peak, plain_peak)


@pytest.mark.gpu
@NEEDS_CUDA
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


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_exported_attention_keeps_the_batch_symbolic(impl, grad):
    """``torch.export`` with a dynamic batch: the fast path has no Python loop over the
    batch while exporting, so one program runs at batch 1 and 7 and equals the plain path
    (the default CPU chunking would have fixed the batch at the example's size)."""
    plain, fast = _attention_pair(impl)
    example = torch.randn(4, 7, 24)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(fast, (example,), dynamic_shapes=({0: batch},)).module()
    for size in (1, 7):
        x = torch.randn(size, 7, 24)
        with torch.no_grad():
            torch.testing.assert_close(program(x)[0], plain(x)[0], **TOL)
