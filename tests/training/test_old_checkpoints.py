"""Checkpoints written before a change of the package's layout still load, evaluate and
resume to the same numbers: ``pre_layout`` (before the one-way layout, 21b8bea) and
``pre_seams`` (before one home per concept, 7304920); each folder's README says how its files
were made. ``pre_seams`` also holds a timm export folder, which must still build in timm with
the same logits and be what the export writes today."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cait.export import export_checkpoint
from cait.inference import evaluate_checkpoint
from cait.models.build import load_for_inference
from cait.training.checkpoint import load_checkpoint
from cait.training.config import config_from_dict
from cait.training.records import TIMING_KEYS
from cait.training.run import train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FOLDERS = ["pre_layout", "pre_seams"]
FILES = ["last.pt", "model.safetensors"]


def _expected(folder: str) -> dict:
    return json.loads((FIXTURES / folder / "expected.json").read_text())


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


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("name", FILES)
def test_old_checkpoints_give_the_same_logits(folder, name):
    expected = torch.tensor(_expected(folder)[name]["logits"])
    torch.testing.assert_close(_logits(FIXTURES / folder / name), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("name", FILES)
def test_old_checkpoints_evaluate_the_same(folder, name):
    result = evaluate_checkpoint(str(FIXTURES / folder / name), "digits", device="cpu")
    expected = _expected(folder)[name]["eval"]
    assert result["images"] == expected["images"]
    assert result["top1"] == expected["top1"] and result["top5"] == expected["top5"]
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-5)


@pytest.mark.parametrize("folder", FOLDERS)
def test_an_old_run_resumes_to_the_same_end(folder, tmp_path):
    resume = tmp_path / "last.pt"
    shutil.copy(FIXTURES / folder / "last.pt", resume)
    saved = dict(load_checkpoint(resume).run["config"])
    # device: the fixture ran on the CPU, where the numbers are reproducible
    overrides = dict(
        resume=str(resume), output=str(tmp_path / "run"), progress=False, tensorboard=False
    )
    result = train(config_from_dict({**saved, **overrides, "device": "cpu"}))
    assert result.completed and [m["epoch"] for m in result.history] == [1, 2]
    got = {k: v for k, v in result.history[1].items() if k not in TIMING_KEYS}
    expected = _expected(folder)["resumed_history"][1]
    assert set(got) == set(expected)
    for key in ("train_loss", "val_loss", "ema_val_loss", "lr"):
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key
    for key in ("epoch", "val_top1", "val_top5", "ema_val_top1", "val_images", "skipped_files"):
        assert got[key] == expected[key], key
    # the weights it ends with are those the old code ended with
    logits = _logits(result.output / "model.safetensors")
    expected_logits = torch.tensor(_expected(folder)["model.safetensors"]["logits"])
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


def test_an_old_timm_export_still_builds_in_timm_with_its_logits():
    timm = pytest.importorskip("timm")
    folder = FIXTURES / "pre_seams" / "timm_export"
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        logits = theirs(_inputs())
    expected = torch.tensor(_expected("pre_seams")["timm_export"]["logits"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_todays_timm_export_of_an_old_checkpoint_is_the_old_folder(tmp_path):
    old = FIXTURES / "pre_seams" / "timm_export"
    export_checkpoint(
        str(FIXTURES / "pre_seams" / "model.safetensors"), "timm", str(tmp_path / "t")
    )
    new = tmp_path / "t"
    assert json.loads((new / "config.json").read_text()) == json.loads(
        (old / "config.json").read_text()
    )
    ours, theirs = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
