"""``cait bench``: throughput and memory figures, the check against timm, the JSON output.

Checks that hold on any device take a ``device`` parameter (``DEVICES`` of conftest.py)
whose CUDA case is marked ``gpu`` and skipped without a CUDA device; ``make test-gpu`` runs
those, and ``examples/gpu_checks.sh`` runs them before its timings.
"""

from __future__ import annotations

import json

import pytest
from conftest import DEVICES, NEEDS_CUDA

from cait.bench import benchmark, format_table
from cait.cli import main


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
