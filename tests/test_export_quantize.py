"""`cait export --format onnx --quantize int8`: ONNX Runtime's int8 quantization of the
exported graph (the linear layers' weights; the attention's products and softmax in fp32),
its agreement with fp32 printed, refused below the threshold with nothing written."""

from __future__ import annotations

from collections import Counter

import pytest
from test_inference import tiny_checkpoint

import cait.export.parity
from cait.cli import main
from cait.export import export_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return tiny_checkpoint(folder, "cait_digits_16", list("0123456789"), seed=7)


def test_int8_onnx_quantizes_the_linear_layers_and_reports_its_agreement(
    checkpoint, tmp_path, capsys
):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_checkpoint(str(checkpoint), "onnx", fp32)
    args = ["export", str(checkpoint), "--format", "onnx", "--output", str(int8)]
    assert main([*args, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "int8: top-1 agreement" in out and "with fp32 on 70 random images" in out
    ops = Counter(node.op_type for node in onnx.load(str(int8)).graph.node)
    plain = Counter(node.op_type for node in onnx.load(str(fp32)).graph.node)
    # the MatMuls with a weight became MatMulInteger; those of two activations (q k^T,
    # attention @ v) and the softmax stay in fp32
    assert ops["MatMulInteger"] > 0 and ops["MatMul"] > 0
    assert ops["Softmax"] == plain["Softmax"] > 0 and "MatMulInteger" not in plain
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_int8_export_below_the_agreement_threshold_is_refused_and_not_written(
    checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cait.export.parity, "QUANTIZED_MIN_AGREEMENT", 1.01)
    out = tmp_path / "int8.onnx"
    args = ["export", str(checkpoint), "--format", "onnx", "--output", str(out)]
    assert main([*args, "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "below the 101% required: not written" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_quantize_needs_the_onnx_format(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    args = ["export", str(checkpoint), "--format", "pt2", "--output", str(out)]
    assert main([*args, "--quantize", "int8"]) == 2
    assert "int8 quantization is ONNX Runtime's: it needs format 'onnx'" in capsys.readouterr().err
