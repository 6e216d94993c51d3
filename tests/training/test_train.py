"""Training end to end on the bundled digits: outputs, exact resume, bad data, NaN, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import cait.models.build
import cait.models.timm_interop
import cait.training.engine
import cait.training.losses
from cait.cli import main as cli_main
from cait.training.checkpoint import load_checkpoint
from cait.training.config import apply_overrides, config_from_dict, load_recipe
from cait.training.records import TIMING_KEYS
from cait.training.run import train

ROOT = Path(__file__).resolve().parents[2]


def digits_config(tmp_path: Path, *overrides: str, recipe: bool = True):
    """The digits recipe shrunk to seconds: a 2-block model, a few epochs, no progress bar.

    The thread count is pinned: these runs are compared bit for bit, and torch's CPU ops sum
    in an order that depends on it (a count that followed the machine's load could differ
    between two runs; cait.threads)."""
    base = load_recipe(ROOT / "recipes" / "digits.yaml") if recipe else {}
    defaults = [
        f"output={tmp_path / 'run'}",
        "model_args.depth=2",
        "epochs=3",
        "progress=false",
        "tensorboard=false",
        "threads=2",
    ]
    return config_from_dict(apply_overrides(base, defaults + list(overrides)))


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_a_short_run_writes_every_output(tmp_path):
    config = digits_config(tmp_path, "epochs=2", "tensorboard=true")
    result = train(config)
    out = result.output
    for name in (
        "last.pt",
        "best.pt",
        "metrics.jsonl",
        "curves.png",
        "model.safetensors",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    rows = _read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["val_images"] == 360
    state = load_checkpoint(out / "last.pt")
    assert state.run["epoch"] == 1 and state.metadata["model"] == "cait_digits_16"
    assert state.run["config"]["model"] == "cait_digits_16"
    assert state.metadata["class_names"] == [str(i) for i in range(10)]
    with Image.open(out / "curves.png") as img:
        assert img.size == (1000, 400)


def _run_in_two_parts(tmp_path, *overrides):
    full = train(digits_config(tmp_path / "full", *overrides))
    first = digits_config(tmp_path / "split", "stop_after=1", *overrides)
    part = train(first)
    assert not part.completed and not (part.output / "model.safetensors").exists()
    resumed = train(
        digits_config(tmp_path / "split", f"resume={part.output / 'last.pt'}", *overrides)
    )
    return full, resumed


def test_resume_is_exact(tmp_path):
    """Stopped after epoch 1 of 3 and resumed: bit-identical weights, EMA and metrics.

    Random crops, colour jitter, RandAugment, mixup/cutmix, random erasing and drop-path
    are all on, so this also proves that every RNG state resumes.
    """
    extra = (
        "augment.auto_augment=rand-m9-mstd0.5-inc1",
        "augment.mixup=0.8",
        "augment.re_prob=0.25",
        "model_args.drop_path_rate=0.1",
    )
    full, resumed = _run_in_two_parts(tmp_path, *extra)
    a, b = load_checkpoint(full.output / "last.pt"), load_checkpoint(resumed.output / "last.pt")
    for key in a.weights:
        assert torch.equal(a.weights[key], b.weights[key]), key
    for key in a.run["ema"]:
        assert torch.equal(a.run["ema"][key], b.run["ema"][key]), key
    rows_a = _read_metrics(full.output / "metrics.jsonl")
    rows_b = _read_metrics(resumed.output / "metrics.jsonl")
    assert len(rows_a) == 3
    assert _strip_timing(rows_a) == _strip_timing(rows_b)


def test_resume_is_exact_with_workers(tmp_path):
    full, resumed = _run_in_two_parts(tmp_path, "data.workers=2")
    a, b = load_checkpoint(full.output / "last.pt"), load_checkpoint(resumed.output / "last.pt")
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_resume_with_another_model_fails_before_training(tmp_path):
    first = train(digits_config(tmp_path, "epochs=1"))
    config = digits_config(tmp_path, "model_args.depth=3", f"resume={first.output / 'last.pt'}")
    with pytest.raises(ValueError, match="resume=.*last.pt holds a checkpoint of another model"):
        train(config)


def test_init_from_refuses_a_timm_model(tmp_path):
    config = config_from_dict(
        {
            "model": "timm:resnet10t",
            "init_from": str(tmp_path / "weights.pth"),
            "output": str(tmp_path / "run"),
            "data": {"path": "digits"},
            "progress": False,
            "tensorboard": False,
        }
    )
    with pytest.raises(ValueError, match="init_from loads CaiT/DeiT weights"):
        train(config)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = digits_config(tmp_path, "log_interval=5")
    real = cait.training.losses.DistillationLoss.__call__
    calls = {"n": 0}

    def poisoned(self, outputs, target, teacher_logits=None):
        calls["n"] += 1
        out = real(self, outputs, target, teacher_logits)
        if calls["n"] > 30:  # epoch 1 has 22 steps; poison epoch 2
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(cait.training.losses.DistillationLoss, "__call__", poisoned)
    with pytest.raises(cait.training.engine.NonFiniteLossError, match="loss became nan in epoch 2"):
        train(config)
    state = load_checkpoint(config.output + "/last.pt")
    assert state.run["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state.weights.values())


def _write_photo_folder(root: Path) -> None:
    """Two classes cut from scikit-learn's bundled photos, in odd modes and broken files."""
    china, flower = load_sample_images().images
    for split in ("train", "val"):
        for name, photo in (("china", china), ("flower", flower)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(6):
                y, x = 40 * i, 60 * i
                Image.fromarray(photo[y : y + 96, x : x + 96]).save(folder / f"rgb{i}.jpg")
    odd = root / "train" / "china"
    crop = Image.fromarray(china[100:196, 100:196])
    crop.convert("L").save(odd / "gray.png")
    crop.convert("RGBA").save(odd / "rgba.png")
    crop.convert("P").save(odd / "palette.png")
    good = (odd / "rgb0.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "notes.png").write_text("this is not an image")
    (root / "val" / "flower" / "broken.png").write_text("neither is this")


def test_bad_images_are_converted_or_skipped_and_reported(tmp_path, caplog):
    data = tmp_path / "photos"
    _write_photo_folder(data)
    config = digits_config(
        tmp_path,
        f"data.path={data}",
        "model=cait_tiny_32",
        "data.batch_size=4",
        "epochs=2",
        recipe=False,
    )
    result = train(config)
    skipped = (result.output / "skipped_files.txt").read_text().splitlines()
    names = sorted(Path(line.split(":")[0]).name for line in skipped)
    assert names == ["broken.png", "empty.jpg", "notes.png", "truncated.jpg"]
    assert "3 unreadable file(s) left out" in caplog.text  # train: reported up front
    rows = _read_metrics(result.output / "metrics.jsonl")
    assert rows[-1]["skipped_files"] == 4
    assert rows[-1]["val_images"] == 12  # the broken val file is left out, nothing counted twice
    state = load_checkpoint(result.output / "last.pt")
    assert state.metadata["class_names"] == ["china", "flower"]


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "data path not found"),
        ("empty_class", "has no image files"),
        ("no_val", "has no val/ folder"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, setup, message):
    root = tmp_path / "data"
    if setup != "missing":
        _write_photo_folder(root)
    if setup == "empty_class":
        (root / "train" / "empty").mkdir()
    if setup == "no_val":
        import shutil

        shutil.rmtree(root / "val")
    config = digits_config(tmp_path, f"data.path={root}", "model=cait_tiny_32", recipe=False)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(config)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_cli_train_eval_predict(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(
        [
            "train",
            "--recipe",
            str(ROOT / "recipes" / "digits.yaml"),
            "--data",
            "digits",
            "--output",
            str(out),
            "--epochs",
            "2",
            "--seed",
            "3",
            "--workers",
            "0",
            "--set",
            "model_args.depth=2",
            "--set",
            "tensorboard=false",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "final val top-1" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt").run["config"]["seed"] == 3

    assert (
        cli_main(
            ["eval", "--checkpoint", str(out / "model.safetensors"), "--data", "digits", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"top1", "top5", "loss", "images"} and result["images"] == 360
    last = _read_metrics(out / "metrics.jsonl")[-1]
    assert result["top1"] == pytest.approx(last["val_top1"])

    digit = tmp_path / "digit.png"
    Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((2, 2), np.uint8))).save(digit)
    assert (
        cli_main(
            ["predict", "--checkpoint", str(out / "best.pt"), str(digit), "--topk", "3", "--json"]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 1 and len(preds[0]["predictions"]) == 3
    assert preds[0]["predictions"][0]["name"] in [str(i) for i in range(10)]
    probs = [p["probability"] for p in preds[0]["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001

    bad = tmp_path / "bad.png"
    bad.write_text("no")
    assert cli_main(["predict", "--checkpoint", str(out / "best.pt"), str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_cli_reports_config_errors(tmp_path, capsys):
    assert (
        cli_main(["train", "--data", "digits", "--output", str(tmp_path), "--set", "optim.lrr=1"])
        == 2
    )
    assert "unknown config keys ['optim.lrr']" in capsys.readouterr().err
    assert cli_main(["train", "--model", "cait_nope", "--output", str(tmp_path)]) == 2
    assert "unknown model 'cait_nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_reach_97_percent_with_a_short_schedule(tmp_path):
    config = digits_config(tmp_path, "model_args.depth=6", "epochs=30")
    result = train(config)
    assert result.history[-1]["val_top1"] >= 97.0, result.history[-1]


def test_eval_and_predict_official_weights_on_an_imagenet_folder(tmp_path, capsys):
    """Official-format 1000-class weights: synset folders match, predictions get names."""
    model = cait.create_model("cait_xxs24_224")
    weights = tmp_path / "XXS24_224.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, weights)
    china, flower = load_sample_images().images
    for synset, photo in (("n01440764", china), ("n01443537", flower)):
        folder = tmp_path / "imagenet" / "val" / synset
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(photo[50 * i : 50 * i + 300, 0:300]).save(folder / f"{i}.JPEG")
    args = [
        "eval",
        "--checkpoint",
        str(weights),
        "--model",
        "cait_xxs24_224",
        "--data",
        str(tmp_path / "imagenet"),
        "--json",
    ]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4
    assert (
        cli_main(
            [
                "predict",
                "--checkpoint",
                str(weights),
                "--model",
                "cait_xxs24_224",
                str(folder / "0.JPEG"),
                "--topk",
                "2",
                "--json",
            ]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)[0]["predictions"]
    names = cait.models.timm_interop.imagenet_class_names()[1]
    assert preds[0]["name"] == names[preds[0]["class"]]
    assert names[0].startswith("tench")
    assert cli_main(["eval", "--checkpoint", str(weights), "--data", "digits"]) == 2
    assert "pass --model NAME, the variant its weights are for" in capsys.readouterr().err
