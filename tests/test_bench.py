"""``cait bench``: throughput and memory figures, the check against timm, the JSON output, what
``import cait.bench`` loads, and the precision agreement of a checkpoint.

Checks that hold on any device take a ``device`` parameter (``DEVICES`` of conftest.py)
whose CUDA case is marked ``gpu`` and skipped without a CUDA device; ``make test-gpu`` runs
those, and ``TESTS=1 examples/gpu_checks.sh`` runs them before its timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEVICES, NEEDS_CUDA

import cait
from cait.bench import benchmark, format_table
from cait.bench.precision import checkpoint_precision_agreement
from cait.cli import main

PRE_LAYOUT = Path(__file__).resolve().parent / "fixtures" / "pre_layout"


@pytest.mark.parametrize("device", DEVICES)
def test_bench_reports_throughput_and_memory(device):
    r = benchmark("cait_digits_16", batch_size=2, rounds=2, steps=1, warmup=1, device=device)
    assert r.mode == "inference" and len(r.timings) == 1 and r.ratio is None
    assert r.device.startswith(device)
    t = r.timings[0]
    assert t.impl == "cait" and t.images_per_s > 0 and len(t.rounds) == 2
    assert "cait_digits_16" in format_table(r)
    r = benchmark(
        "cait_digits_16", batch_size=2, rounds=1, steps=1, warmup=0, train=True, device=device
    )
    assert r.mode == "train" and r.timings[0].images_per_s > 0


def test_bench_compare_timm_needs_a_timm_model():
    with pytest.raises(ValueError, match="timm has no model named 'cait_digits_16'"):
        benchmark("cait_digits_16", batch_size=2, compare="timm")


def test_importing_bench_loads_no_timm_torchvision_or_matplotlib():
    """The CLI reads ``DTYPES`` and ``COMPARE_WITH`` from ``cait.bench`` to build its flags;
    that import loads the model side only (timm is imported when a comparison is built)."""
    code = "import sys, cait.bench; print(' '.join(sys.modules))"
    src = str(Path(cait.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    loaded = {name.split(".")[0] for name in out.stdout.split()}
    assert "cait" in loaded
    assert not loaded & {"timm", "torchvision", "matplotlib", "onnx", "gradio"}


@pytest.mark.parametrize("device", DEVICES)
def test_bench_compare_timm_json(device, capsys):
    argv = ["bench", "--model", "cait_xxs24_224", "--batch-size", "1", "--compare", "timm"]
    argv += ["--device", device]
    assert main(argv + ["--rounds", "1", "--steps", "1", "--warmup", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [t["impl"] for t in r["timings"]] == ["cait", "timm"]
    assert (
        r["ratio"] > 0
        and r["round_ratio"] > 0
        and r["max_abs_diff"] < 1e-3
        and r["top1_agreement"] == 1.0
    )
    for key in ("model", "mode", "batch_size", "device", "threads", "torch_version"):
        assert key in r
    assert r["device"].startswith(device)
    assert all(t["peak_mem_mib"] is None or t["peak_mem_mib"] >= 0 for t in r["timings"])


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("train", [False, True])
def test_bench_compare_timm_in_bf16_on_cuda(train):
    """bf16 with fp32 weights (autocast), for inference and training: the fp32 check against
    timm passes and both models' peak memory is measured."""
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


def test_checkpoint_precision_agreement_on_the_checkpoints_validation_split():
    """What ``examples/bench_cpu.sh`` reports for the demo model: the fp32 top-1 is what
    ``cait eval`` gives for the same weights file on the digits test split."""
    expected = json.loads((PRE_LAYOUT / "expected.json").read_text())["model.safetensors"]
    r = checkpoint_precision_agreement(str(PRE_LAYOUT / "model.safetensors"), "digits", "bf16")
    assert r["images"] == expected["eval"]["images"] == 360
    assert 100 * r["top1_fp32"] == pytest.approx(expected["eval"]["top1"])
    assert 0.0 <= r["top1_bf16"] <= 1.0 and 0.9 <= r["agreement"] <= 1.0
