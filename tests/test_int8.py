"""The oneDNN int8 engine (cait.precision.int8): each layer against the int8 arithmetic
written out in fp32, the layers it replaces, calibration (static scales, the MLP's uint8
hidden tensor, predictions independent of the batch), the fallback to torch.ao on a CPU
without VNNI, and --calibrate through eval and predict."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line, randomize_
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic

import cait.precision
from cait.models.layers import Mlp
from cait.models.registry import create_model
from cait.precision import cpu_flags, quantize_int8
from cait.precision.int8 import (
    KEEP_FLOAT,
    Int8Linear,
    activation_qparams,
    calibrate,
    quantize_linear_layers,
    supported,
)

# the engine multiplies exactly only with VNNI; elsewhere cait.precision never builds it
needs_vnni = pytest.mark.skipif(
    not supported(cpu_flags()), reason="oneDNN int8 needs VNNI (avx512_vnni, avx_vnni, amx_int8)"
)


def _quantize_input(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 codes of ``x``, as integers in a float tensor (the formula, not torch's op)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255)


def _reference(linear: nn.Linear, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """What an int8 linear layer computes, in fp32: per-channel symmetric int8 weights,
    the input in uint8 at ``(scale, zero_point)``, products summed exactly, then scaled."""
    w = linear.weight.detach()
    w_scale = w.abs().amax(dim=1) / 127
    w_q = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127)
    x_q = _quantize_input(x, scale, zero_point) - zero_point
    acc = x_q.double() @ w_q.double().T  # exact: integers well below 2**53
    return (acc * scale * w_scale.double()).float() + linear.bias.detach()


def _linear(c_in: int = 24, c_out: int = 40, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(c_in, c_out)
    nn.init.normal_(linear.bias, std=0.5)
    return linear


def test_activation_qparams_cover_the_range_and_zero_exactly():
    scale, zero_point = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zero_point == round(1.0 / scale)
    assert activation_qparams(0.5, 2.0) == (pytest.approx(2.0 / 255), 0)  # 0 is included
    assert activation_qparams(-2.0, -1.0) == (pytest.approx(2.0 / 255), 255)
    scale, zero_point = activation_qparams(0.0, 0.0)  # a constant input: no division by 0
    assert scale > 0 and zero_point == 0


@needs_vnni
@pytest.mark.parametrize("post_op", ["none", "gelu"])
def test_a_dynamic_layer_is_the_int8_formula(post_op):
    linear = _linear()
    x = torch.randn(5, 7, 24) * 2 + 0.3  # any leading shape
    layer = Int8Linear(linear, post_op=post_op)
    with torch.inference_mode():
        got = layer(x)
    scale, zero_point = activation_qparams(x.min().item(), x.max().item())
    want = _reference(linear, x.reshape(-1, 24), scale, zero_point).reshape(5, 7, 40)
    if post_op == "gelu":
        want = F.gelu(want)
    assert got.shape == (5, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and close to the float layer: int8 rounding only
    with torch.inference_mode():
        float_out = linear(x) if post_op == "none" else F.gelu(linear(x))
    assert (got - float_out).abs().max() < 0.05 * float_out.abs().max()


@needs_vnni
def test_a_static_layer_saturates_at_its_scales_and_can_write_uint8():
    linear = _linear(seed=1)
    layer = Int8Linear(linear)
    layer.input_qparams = activation_qparams(-1.0, 1.0)
    x = torch.randn(64, 24) * 3  # beyond the calibrated range: clamped, as the formula says
    with torch.inference_mode():
        got = layer(x)
        torch.testing.assert_close(
            got, _reference(linear, x, *layer.input_qparams), atol=1e-4, rtol=1e-4
        )
        layer.output_qparams = activation_qparams(got.min().item(), got.max().item())
        codes = layer(x)
    assert codes.dtype == torch.uint8
    out_scale, out_zero_point = layer.output_qparams
    assert (
        torch.clamp(torch.round(got / out_scale) + out_zero_point, 0, 255) - codes
    ).abs().max() <= 1
    # a uint8 input is taken as codes at the layer's input scale
    follower = Int8Linear(_linear(40, 8, seed=2))
    with pytest.raises(ValueError) as err:
        follower(codes)
    one_line(err, "uint8 input needs input_qparams")


def _model(seed: int = 0) -> nn.Module:
    return randomize_(create_model("cait_digits_16", depth=2), seed=seed).eval()


@needs_vnni
def test_every_linear_but_the_mixing_is_replaced_and_the_gelu_fused():
    model = _model()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    count = quantize_linear_layers(model)
    kinds = dict(model.named_modules())
    kept = [n for n in names if n.rpartition(".")[2] in KEEP_FLOAT]
    assert kept and count == len(names) - len(kept)
    for name in names:
        assert isinstance(kinds[name], nn.Linear if name in kept else Int8Linear), name
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert mlps and all(m.fc1.post_op == "gelu" and isinstance(m.act, nn.Identity) for m in mlps)


def _calibrated(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    quantized = quantize_int8(model)
    calibrate(quantized, batches)
    return quantized


@needs_vnni
def test_calibration_fixes_the_scales_and_chains_the_mlp_in_uint8():
    model = _model()
    batches = [
        torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    quantized = _calibrated(model, batches)
    layers = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert all(m.input_qparams is not None and not m.observing for m in layers)
    for mlp in (m for m in quantized.modules() if isinstance(m, Mlp)):
        assert mlp.fc1.output_qparams == mlp.fc2.input_qparams
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        want, got = model(x), quantized(x)
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    with pytest.raises(ValueError) as err:
        calibrate(quantize_int8(model), [])
    one_line(err, "at least one image")


@needs_vnni
def test_static_scales_make_an_image_s_prediction_independent_of_its_batch():
    """With dynamic scales one bright image in a batch coarsens every other image's
    quantization; calibrated scales do not move."""
    model = _model(seed=2)
    gen = torch.Generator().manual_seed(3)
    calibration = [torch.randn(16, 3, 16, 16, generator=gen)]
    x = torch.randn(4, 3, 16, 16, generator=gen)
    bright = torch.cat([x, 40 * torch.randn(1, 3, 16, 16, generator=gen)])
    static, dynamic = _calibrated(model, calibration), quantize_int8(model)
    with torch.inference_mode():
        static_moved = (static(bright)[:4] - static(x)).abs().max()
        dynamic_moved = (dynamic(bright)[:4] - dynamic(x)).abs().max()
    assert static_moved < 1e-4
    assert dynamic_moved > 100 * max(static_moved, 1e-6)


def test_without_vnni_int8_falls_back_to_torch_ao_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    caplog.set_level(logging.WARNING, logger="cait.precision")
    quantized = quantize_int8(_model(), calibration=[torch.randn(2, 3, 16, 16)])
    assert any(isinstance(m, quantized_dynamic.Linear) for m in quantized.modules())
    assert not any(isinstance(m, Int8Linear) for m in quantized.modules())
    assert "avx512_vnni" in caplog.text and "calibration images are not used" in caplog.text


def _checkpoint(tmp_path):
    from test_inference import tiny_checkpoint

    return str(tiny_checkpoint(tmp_path, "cait_digits_16", list("0123456789"), seed=1))


@needs_vnni
def test_eval_and_predict_calibrate_from_a_source(tmp_path, capsys, caplog):
    from cait.cli import main

    caplog.set_level(logging.INFO)
    ckpt = _checkpoint(tmp_path)
    flags = ["--precision", "int8", "--calibrate", "digits", "--calibrate-images", "40"]
    assert main(["eval", "--checkpoint", ckpt, "--data", "digits", "--json", *flags]) == 0
    assert "calibration: 40 images from the train split of digits" in caplog.text
    assert "precision: int8 static quantization (calibrated) on cpu" in caplog.text
    assert '"top1"' in capsys.readouterr().out
    out = tmp_path / "rows.csv"
    argv = ["predict", "--checkpoint", ckpt, "--data", "digits", "--output", str(out), *flags]
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 1 + 360  # the header and the eval split


def test_calibration_asks_for_int8_and_a_readable_source(tmp_path, capsys):
    from cait.cli import main
    from cait.inference.calibration import Calibration

    ckpt = _checkpoint(tmp_path)
    base = ["eval", "--checkpoint", ckpt, "--data", "digits", "--calibrate", "digits"]
    for precision in (["fp32"], ["fp32", "bf16"]):
        assert main([*base, "--precision", *precision]) == 2
        err = capsys.readouterr().err.strip()
        assert "calibration is for precision int8" in err and "\n" not in err
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main([*base, "--precision", "int8", "--calibrate-images", "0"])
    assert stop.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err
    missing = str(tmp_path / "nowhere")
    argv = ["predict", "--checkpoint", ckpt, "--data", "digits", "--precision", "int8"]
    assert main([*argv, "--calibrate", missing]) == 2
    assert "nowhere" in capsys.readouterr().err
    for bad in ({"images": 0}, {"split": "test"}):
        with pytest.raises(ValueError) as err:
            Calibration("digits", **bad)
        one_line(err, "calibration")


@needs_vnni
@pytest.mark.parametrize("flags", [{"avx512_vnni", "avx512_bf16"}, {"avx512_vnni"}])
def test_the_attention_runs_in_bf16_only_where_the_cpu_has_it(flags, monkeypatch):
    """qkv writes bf16 for the attention's products on a CPU with bf16 instructions; the
    traced (plain) attention path then runs too, and agrees with the fast path."""
    monkeypatch.setattr(cait.precision, "cpu_flags", lambda: flags)
    model = _model(seed=4)
    quantized = quantize_int8(model, calibration=[torch.randn(8, 3, 16, 16)])
    want = torch.bfloat16 if "avx512_bf16" in flags else torch.float32
    qkv = [m.attn.qkv for m in quantized.blocks]
    assert qkv and all(layer.output_dtype == want for layer in qkv)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        fast, reference = quantized(x), model(x)
        traced = quantized.forward_trace(x).logits
    assert fast.dtype == torch.float32
    assert (fast - reference).abs().max() < 0.1 * reference.abs().max()
    # the traced path rounds the mixed logits to bf16 where the kernel keeps them in fp32
    assert (traced - fast).abs().max() < 0.05 * fast.abs().max()
    assert torch.equal(traced.argmax(-1), fast.argmax(-1))


def test_calibration_reads_a_one_split_source_lazily_and_as_the_cli_counts(tmp_path):
    """A folder of class folders (no train/) calibrates on its images; nothing is read
    before the precision is checked; the CLI's default count is the library's."""
    import argparse

    from PIL import Image

    from cait.cli._common import calibrate_flags
    from cait.inference import load_for_inference
    from cait.inference.calibration import (
        CALIBRATION_IMAGES,
        Calibration,
        calibration_batches,
        prepare_loaded,
    )

    folder = tmp_path / "photos"
    for i in range(5):
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(folder / "ab"[i % 2] / f"{i}.png")
    loaded = load_for_inference(_checkpoint(tmp_path))
    batches = list(calibration_batches(Calibration(str(folder), images=4), loaded))
    assert sum(len(b) for b in batches) == 4 and batches[0].shape[1:] == (3, 16, 16)
    missing = Calibration(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError) as err:  # the device is refused before the source is read
        prepare_loaded(loaded, "int8", torch.device("cuda"), missing)
    one_line(err, "int8 runs on the CPU only")
    parser = argparse.ArgumentParser()
    calibrate_flags(parser)
    assert parser.parse_args([]).calibrate_images == CALIBRATION_IMAGES
