"""Class names are checked where a model meets data or another model in training: a resume
after a class folder was renamed, a teacher of ours and ``init_from`` weights of ours whose
classes are named otherwise than the data's are refused in one line naming the first
mismatch; ``data.classes_by_position`` (``--classes-by-position``) maps them by index with a
warning (issue 28; the helper is cait.data.classes, eval's case tests/test_eval_classes.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_line
from PIL import Image
from test_train import digits_config  # tests/training is on the path (no __init__)

from cait.cli import main as cli_main
from cait.models.registry import InputSpec
from cait.training.checkpoint import LAST, WEIGHTS
from cait.training.run import train
from cait.training.teacher import load_teacher

SETTINGS = InputSpec(16, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3)


def image_folders(root: Path, classes: list[str]) -> Path:
    """``root/train/<class>`` (4 images each) and ``root/val/<class>`` (2), 16x16 noise."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def rename_class(root: Path, old: str, new: str) -> None:
    for split in ("train", "val"):
        (root / split / old).rename(root / split / new)


def folder_config(tmp_path: Path, data: Path, *overrides: str):
    """One epoch of a 2-block model on the image folders ``data``, batches of 4."""
    base = [f"data.path={data}", "data.batch_size=4", "epochs=1", "ema=false"]
    return digits_config(tmp_path, *base, *overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A one-epoch run on classes ``a`` and ``b``: its folder holds last.pt and the weights."""
    root = tmp_path_factory.mktemp("ab")
    train(folder_config(root, image_folders(root / "data", ["a", "b"])))
    return root / "run"


@pytest.fixture
def renamed(tmp_path) -> Path:
    """Classes ``a`` and ``b`` with ``a`` renamed ``z``: sorted, ``b`` is now class 0."""
    data = image_folders(tmp_path / "data", ["a", "b"])
    rename_class(data, "a", "z")
    return data


def test_resume_after_a_class_folder_was_renamed_is_refused(finished, renamed, tmp_path):
    """Before: the run resumed with every label shifted."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    config = folder_config(tmp_path, renamed, f"resume={run / LAST}", "epochs=2")
    with pytest.raises(ValueError) as err:
        train(config)
    one_line(err, f"resume={run / LAST}: class 0 of the checkpoint is 'a', of the data 'b'")


def test_resume_by_position_when_asked_through_the_cli(finished, renamed, tmp_path, caplog):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    args = ["train", "--recipe", "recipes/digits.yaml", "--data", str(renamed)]
    args += ["--output", str(run), "--resume", str(run / LAST), "--epochs", "2"]
    args += ["--set", "data.batch_size=4", "--set", "ema=false", "--set", "model_args.depth=2"]
    args += ["--no-progress", "--set", "tensorboard=false", "--threads", "2"]
    assert cli_main(args) == 2
    with caplog.at_level(logging.WARNING):
        assert cli_main([*args, "--classes-by-position"]) == 0
    assert "class 0 of the checkpoint is 'a', of the data 'b'" in caplog.text
    # the flag changes nothing computed: no "changed settings" warning names it
    assert "data.classes_by_position" not in caplog.text


def test_a_teacher_of_other_class_names_is_refused(finished, renamed, tmp_path):
    """Before: its classes were permuted against the student's without a word."""
    teacher = str(finished / WEIGHTS)
    distil = ["distill.kind=soft", f"distill.teacher={teacher}"]
    with pytest.raises(ValueError) as err:
        train(folder_config(tmp_path, renamed, *distil))
    one_line(err, f"teacher {teacher}: class 0 of the teacher is 'a', of the data 'b'")
    assert not (tmp_path / "run" / LAST).exists()


def test_a_teacher_is_checked_by_name_and_mapped_by_position_when_asked(finished, caplog):
    teacher = str(finished / WEIGHTS)
    load_teacher(teacher, 2, SETTINGS, class_names=["a", "b"])  # the same names pass
    with pytest.raises(ValueError, match="class 1 of the teacher is 'b', of the data 'c'"):
        load_teacher(teacher, 2, SETTINGS, class_names=["a", "c"])
    with caplog.at_level(logging.WARNING, logger="cait.data.classes"):
        load_teacher(teacher, 2, SETTINGS, class_names=["a", "c"], by_position=True)
    assert "class 1 of the teacher is 'b', of the data 'c'" in caplog.text


def test_init_from_weights_of_other_class_names_is_refused(finished, renamed, tmp_path):
    """Before: the head was kept, its classes permuted against the data's."""
    weights = finished / WEIGHTS
    with pytest.raises(ValueError) as err:
        train(folder_config(tmp_path, renamed, f"init_from={weights}"))
    one_line(err, f"init_from={weights}: class 0 of the checkpoint is 'a', of the data 'b'")


def test_init_from_by_position_or_with_another_class_count(finished, renamed, tmp_path, caplog):
    """By position when asked; with another class count the head starts afresh, so the
    names do not matter."""
    weights = finished / WEIGHTS
    asked = ["data.classes_by_position=true", f"init_from={weights}"]
    with caplog.at_level(logging.WARNING, logger="cait.data.classes"):
        assert train(folder_config(tmp_path / "asked", renamed, *asked)).completed
    assert "class 0 of the checkpoint is 'a', of the data 'b'" in caplog.text
    three = image_folders(tmp_path / "three", ["x", "y", "z"])
    assert train(folder_config(tmp_path / "other", three, f"init_from={weights}")).completed
