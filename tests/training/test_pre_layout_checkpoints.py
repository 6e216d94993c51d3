"""Checkpoints written before the package layout change still load, evaluate and resume to
the same numbers (``tests/fixtures/pre_layout/README.md`` says how they were made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cait.inference import evaluate_checkpoint
from cait.models.build import load_for_inference
from cait.training.checkpoint import load_checkpoint
from cait.training.config import config_from_dict
from cait.training.records import TIMING_KEYS
from cait.training.run import train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_layout"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FILES = ["last.pt", "model.safetensors"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The fixtures were computed on one thread; the summation order follows the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g)


def _logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_for_inference(str(path)).model(_inputs())


@pytest.mark.parametrize("name", FILES)
def test_old_checkpoints_give_the_same_logits(name):
    expected = torch.tensor(EXPECTED[name]["logits"])
    torch.testing.assert_close(_logits(FIXTURES / name), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FILES)
def test_old_checkpoints_evaluate_the_same(name):
    result = evaluate_checkpoint(str(FIXTURES / name), "digits", device="cpu")
    expected = EXPECTED[name]["eval"]
    assert result["images"] == expected["images"]
    assert result["top1"] == expected["top1"] and result["top5"] == expected["top5"]
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-5)


def test_an_old_run_resumes_to_the_same_end(tmp_path):
    resume = tmp_path / "last.pt"
    shutil.copy(FIXTURES / "last.pt", resume)
    saved = dict(load_checkpoint(resume)["config"])
    # device: the fixture ran on the CPU, where the numbers are reproducible
    overrides = dict(
        resume=str(resume), output=str(tmp_path / "run"), progress=False, tensorboard=False
    )
    result = train(config_from_dict({**saved, **overrides, "device": "cpu"}))
    assert result.completed and [m["epoch"] for m in result.history] == [1, 2]
    got = {k: v for k, v in result.history[1].items() if k not in TIMING_KEYS}
    expected = EXPECTED["resumed_history"][1]
    assert set(got) == set(expected)
    for key in ("train_loss", "val_loss", "ema_val_loss", "lr"):
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key
    for key in ("epoch", "val_top1", "val_top5", "ema_val_top1", "val_images", "skipped_files"):
        assert got[key] == expected[key], key
    # the weights it ends with are those the old code ended with
    logits = _logits(result.output / "model.safetensors")
    expected_logits = torch.tensor(EXPECTED["model.safetensors"]["logits"])
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
