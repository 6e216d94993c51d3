"""``cait eval`` compares the checkpoint's class names with the data's before it evaluates:
a difference is one line naming the first mismatch, unless ``--classes-by-position`` asks
for mapping by index (issue 28; the helper is cait.data.classes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import one_line
from PIL import Image
from test_inference import DIGITS, tiny_checkpoint

from cait.cli import main
from cait.data.classes import check_class_names, first_class_mismatch
from cait.inference import evaluate_checkpoint
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import checkpoint_metadata, model_spec, save_safetensors

LETTERS = list("abcdefghij")


def test_the_first_mismatch_is_named_and_long_names_are_cut():
    labels = ("the checkpoint", "the data")
    assert first_class_mismatch(list("abc"), list("abc"), labels) is None
    assert first_class_mismatch(list("abcd"), list("abxd"), labels) == (
        "class 2 of the checkpoint is 'c', of the data 'x'"
    )
    assert first_class_mismatch(list("abc"), list("ab"), labels) == (
        "the checkpoint has 3 classes, the data 2"
    )
    long = first_class_mismatch(["y" * 10_000], ["z"], labels)
    assert long is not None and len(long) < 200


def test_by_position_warns_and_maps_only_labels_the_model_has(caplog):
    labels = ("the checkpoint", "the data")
    with pytest.raises(ValueError) as err:
        check_class_names(list("ab"), list("ba"), labels, "here")
    one_line(
        err, "here: class 0 of the checkpoint is 'a', of the data 'b'", "--classes-by-position"
    )
    with caplog.at_level(logging.WARNING, logger="cait.data.classes"):
        check_class_names(list("abc"), list("ba"), labels, "here", by_position=True)
    assert "the checkpoint has 3 classes, the data 2" in caplog.text
    with pytest.raises(ValueError) as err:  # label 2 of the data would have no output
        check_class_names(list("ab"), list("abc"), labels, "here", by_position=True)
    one_line(err, "the checkpoint has 2 classes, the data 3", "no class of the checkpoint")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("classes")
    return {
        "letters": tiny_checkpoint(folder, DIGITS, LETTERS, seed=1),
        "three": _three_classes(folder),
    }


def _three_classes(folder: Path) -> Path:
    args = {"depth": 2, "num_classes": 3}
    model = create_model(DIGITS, **args)
    spec = model_spec(DIGITS, model, args)
    meta = checkpoint_metadata(spec, get_variant(DIGITS).input_spec, ["cat", "dog", "eel"])
    path = folder / "three.safetensors"
    save_safetensors(model.state_dict(), path, meta)
    return path


def _eval(checkpoint: Path, data: str, capsys, *flags: str) -> tuple[int, str, str]:
    status = main(["eval", "--checkpoint", str(checkpoint), "--data", data, "--json", *flags])
    out, err = capsys.readouterr()
    return status, out, err


def test_eval_refuses_digits_for_a_checkpoint_of_other_class_names(checkpoints, capsys):
    """Before: top-1 of about 10 % and not a word."""
    status, out, err = _eval(checkpoints["letters"], "digits", capsys)
    assert status == 2 and not out
    assert "class 0 of the checkpoint is 'a', of the data '0'" in err
    assert "--classes-by-position" in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_digits_for_a_three_class_checkpoint(checkpoints, capsys):
    """Before: an IndexError from the loss; by position too, as 7 labels have no output."""
    for flags in ((), ("--classes-by-position",)):
        status, out, err = _eval(checkpoints["three"], "digits", capsys, *flags)
        assert status == 2 and not out
        assert "the checkpoint has 3 classes, the data 10" in err
        assert len(err.strip().splitlines()) == 1, err


def test_classes_by_position_evaluates_with_a_warning(checkpoints, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="cait.data.classes"):
        status, out, _ = _eval(checkpoints["letters"], "digits", capsys, "--classes-by-position")
    assert status == 0 and json.loads(out)["images"] == 360
    assert "class 0 of the checkpoint is 'a', of the data '0'" in caplog.text


def test_folders_go_by_name_or_by_position_when_asked(checkpoints, tmp_path, caplog):
    """Class folders go by name (a subset is fine, an unknown folder refused as before);
    by position they are the sorted folders, named in a warning."""
    for name in ("dog", "eel"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), "white").save(tmp_path / "val" / name / "0.png")
    three = str(checkpoints["three"])
    assert evaluate_checkpoint(three, str(tmp_path), device="cpu")["images"] == 2
    (tmp_path / "val" / "eel").rename(tmp_path / "val" / "emu")
    with pytest.raises(ValueError, match=r"class folders not in training: \['emu'\]"):
        evaluate_checkpoint(three, str(tmp_path), device="cpu")
    with caplog.at_level(logging.WARNING, logger="cait.data.classes"):
        result = evaluate_checkpoint(three, str(tmp_path), device="cpu", classes_by_position=True)
    assert result["images"] == 2
    assert "the checkpoint has 3 classes, the data 2" in caplog.text
