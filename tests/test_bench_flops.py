"""Model FLOP utilisation in ``cait bench`` (:mod:`cait.bench.flops`): the count against
hand-counted layers, its independence of the attention kernel, the peak-rate table, and the
figures in a benchmark's result and table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cait
from cait.bench import benchmark, format_table
from cait.bench import flops as flops_module
from cait.bench.flops import flops_per_image, peak_tflops


def test_flops_of_a_linear_layer_by_hand():
    """Linear(8, 5) then Linear(5, 3): 2 * (8 * 5 + 5 * 3) FLOPs forward; training adds
    each weight's gradient and the second layer's input gradient (the images need none)."""
    model = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 3))
    assert flops_per_image(model, (8,), train=False) == 2 * (8 * 5 + 5 * 3)
    assert flops_per_image(model, (8,), train=True) == 2 * (2 * 8 * 5 + 3 * 5 * 3)
    assert model[0].weight.device.type == "cpu"  # the count ran on a copy


def test_flops_do_not_depend_on_the_attention_kernel():
    """Model FLOPs: the fast kernels (which a counter on real tensors would not see) count
    as the plain path; a cast model counts the same as in fp32."""
    counts = {
        impl: flops_per_image(
            cait.create_model("cait_digits_16", attn_impl=impl), (3, 16, 16), False
        )
        for impl in ("plain", "fast", "recompute")
    }
    assert len(set(counts.values())) == 1 and counts["plain"] > 0, counts
    bf16 = cait.create_model("cait_digits_16").to(torch.bfloat16)
    assert flops_per_image(bf16, (3, 16, 16), False) == counts["plain"]


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "fp32", 67.0),
        ("NVIDIA GeForce RTX 4090", "fp16", 165.2),
        ("Some Other GPU", "bf16", None),
    ],
)
def test_peak_rate_by_card_name(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda"), dtype) == expected
    assert peak_tflops(torch.device("cpu"), dtype) is None
    assert set(flops_module.PEAK_TFLOPS["H100"]) == {"bf16", "fp16", "fp32"}


def test_bench_reports_tflops_and_mfu():
    r = benchmark("cait_digits_16", batch_size=2, rounds=1, steps=1, warmup=0)
    t = r.timings[0]
    assert (
        t.gflop_per_image
        == flops_per_image(cait.create_model("cait_digits_16"), (3, 16, 16), False) / 1e9
    )
    assert t.tflops == pytest.approx(t.gflop_per_image * t.images_per_s / 1e3)
    assert t.mfu is None  # no peak rate for the CPU
    assert "MFU" in format_table(r) and "TFLOP/s" in format_table(r)
