"""Inference precisions (cait.precision): the device and CPU checks, int8's quantized copy
(which layers, the caller's model untouched, the talking-heads kernels under it), bf16
autocast, and --precision through eval, bench and predict."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import one_line, randomize_
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic

import cait.precision
from cait.bench import benchmark
from cait.bench.precision import precision_agreement
from cait.inference import evaluate_checkpoint
from cait.kernels import native
from cait.models.registry import create_model
from cait.precision import check_precision, cpu_flags, prepare_model, quantize_int8
from cait.precision.bf16 import Bf16Linear
from cait.precision.int8 import Int8Linear

CPU = torch.device("cpu")


def _model(impl: str = "fast", seed: int = 0) -> nn.Module:
    return randomize_(create_model("cait_digits_16", depth=2, attn_impl=impl), seed=seed).eval()


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nflags : x\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


def test_int8_on_cuda_is_one_line_error():
    with pytest.raises(ValueError) as err:
        check_precision("int8", torch.device("cuda"))
    one_line(err, "int8 runs on the CPU only", "bf16")


def test_bf16_on_a_cpu_without_the_flags_is_one_line_error(monkeypatch):
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(ValueError) as err:
        check_precision("bf16", CPU)
    one_line(err, "avx512_bf16", "amx_bf16", "lscpu")
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: {"amx_bf16"})
    check_precision("bf16", CPU)  # AMX alone is enough
    check_precision("bf16", torch.device("cuda"))  # CUDA is not asked for CPU flags


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError) as err:
        check_precision("fp8", CPU)
    one_line(err, "fp32, bf16, int8", "'fp8'")


@pytest.mark.parametrize("flags", [{"avx512_vnni"}, {"avx2"}], ids=["onednn", "torch.ao"])
def test_int8_quantizes_the_linear_layers_but_the_mixing_and_leaves_the_model_alone(
    flags, monkeypatch
):
    """oneDNN's engine with VNNI, torch.ao's without (cait.precision.int8)."""
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: flags)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model)
    kinds = dict(quantized.named_modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    engine = Int8Linear if "avx512_vnni" in flags else quantized_dynamic.Linear
    for name in linears:
        mixing = name.endswith(("proj_l", "proj_w"))
        want = nn.Linear if mixing else engine
        assert type(kinds[name]) is want, name
    assert any(n.endswith("head") for n in linears) and any("qkv" in n for n in linears)
    # the caller's model is unchanged: still float linears with the same weights
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in linears)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode():
        want, got = model(_images()), quantized(_images())
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    # random weights on random images: close logits, so a rounding changes some top-1s
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


@pytest.mark.skipif(not native.available(), reason="the C++ kernel could not be built")
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_the_native_kernel_agrees_with_the_plain_attention_in_low_precision(precision, monkeypatch):
    """The C++ talking-heads kernel (impl fast, on the CPU) under a quantized model and under
    bf16 autocast gives what the reference einsum path gives in the same precision."""
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: {"avx512_bf16"})
    fast, plain = _model("fast", seed=3), _model("plain", seed=3)
    x = _images(8, seed=4)
    outputs = []
    for model in (fast, plain):
        prepared = prepare_model(model, precision, CPU)
        with torch.inference_mode(), prepared.autocast():
            outputs.append(prepared.model(x).float())
    tolerance = 1e-4 if precision == "int8" else 0.05
    assert (outputs[0] - outputs[1]).abs().max() < tolerance * outputs[1].abs().max()
    assert torch.equal(outputs[0].argmax(-1), outputs[1].argmax(-1))


def test_bf16_runs_under_autocast_and_logs_the_precision(monkeypatch, caplog):
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: {"avx512_bf16"})
    caplog.set_level(logging.INFO, logger="cait.precision")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_model(model, "bf16", CPU)
    # on the CPU a copy whose linear layers hold packed bf16 weights (cait.precision.bf16)
    packed = [m for m in prepared.model.modules() if isinstance(m, Bf16Linear)]
    assert prepared.model is not model and packed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode(), prepared.autocast():
        out = prepared.model(_images())
        plain = model(_images())  # autocast over the fp32 model, as on CUDA
    assert out.dtype == torch.bfloat16
    assert (out.float() - plain.float()).abs().max() < 0.05 * plain.float().abs().max()
    assert "precision: bf16 autocast on cpu" in caplog.text


def test_precision_agreement_in_int8():
    model = _model()
    x = _images(32)
    targets = model(x).argmax(-1)
    result = precision_agreement(model, x, targets, "int8")
    assert result["agreement"] >= 0.75 and result["top1_fp32"] == 1.0
    assert "top1_int8" in result


def test_bench_times_int8_and_refuses_it_for_training():
    r = benchmark("cait_digits_16", batch_size=4, dtype="int8", rounds=1, steps=1, warmup=0)
    assert r.timings[0].dtype == "int8" and r.timings[0].images_per_s > 0
    with pytest.raises(ValueError) as err:
        benchmark("cait_digits_16", dtype="int8", train=True, rounds=1, steps=1)
    one_line(err, "int8 is an inference precision")


def test_eval_in_int8_and_amp_with_precision_refused(tmp_path):
    from test_inference import tiny_checkpoint

    ckpt = str(tiny_checkpoint(tmp_path, "cait_digits_16", list("0123456789"), seed=1))
    fp32 = evaluate_checkpoint(ckpt, "digits", batch_size=128)
    int8 = evaluate_checkpoint(ckpt, "digits", batch_size=128, precision="int8")
    assert int8["precision"] == "int8" and fp32["precision"] == "fp32"
    assert int8["images"] == fp32["images"] == 360
    assert abs(int8["top1"] - fp32["top1"]) <= 2.0
    with pytest.raises(ValueError) as err:
        evaluate_checkpoint(ckpt, "digits", amp="bf16", precision="int8")
    one_line(err, "either amp", "or precision")


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_the_app_serves_a_model_in_a_precision(precision, tmp_path, monkeypatch):
    from PIL import Image
    from test_inference import tiny_checkpoint

    from cait.app.served import analyse, load_app_models, retrace

    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: {"avx512_bf16"})
    ckpt = str(tiny_checkpoint(tmp_path, "cait_digits_16", list("0123456789"), seed=1))
    fp32, low = (load_app_models([ckpt], precision=p)[0] for p in ("fp32", precision))
    engines = (quantized_dynamic.Linear, Int8Linear)
    quantized = any(isinstance(m, engines) for m in low.model.modules())
    assert quantized == (precision == "int8")
    image = Image.new("RGB", (16, 16), (200, 30, 90))
    want, got = analyse(fp32, image), analyse(low, image)
    assert got.predictions[0]["class"] == want.predictions[0]["class"]
    assert abs(got.predictions[0]["probability"] - want.predictions[0]["probability"]) < 0.05
    assert retrace(low, got, 0) is not None


def test_cait_predict_files_in_int8_logs_the_precision(tmp_path, capsys, caplog):
    from PIL import Image
    from test_inference import tiny_checkpoint

    from cait.cli import main

    caplog.set_level(logging.INFO, logger="cait.precision")
    ckpt = tiny_checkpoint(tmp_path, "cait_digits_16", list("0123456789"), seed=1)
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (10, 200, 90)).save(image)
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--precision", "int8"]) == 0
    assert "precision: int8 dynamic quantization on cpu" in caplog.text
    assert str(image) in capsys.readouterr().out
    assert main(["app", "--checkpoint", str(ckpt), "--precision", "int8", "--port", "0"]) == 2
    assert "port must be in [1, 65535]" in capsys.readouterr().err
