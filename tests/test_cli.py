"""The CLI's closed choices are the library's Literals; its errors are one line."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from cait.bench import DTYPES
from cait.cli import build_parser, main
from cait.models.config import AttnImpl
from cait.runtime import Amp, Device, DeviceType
from cait.training.config import DistillKind


def _option(command: str, flag: str) -> argparse.Action:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    (action,) = [a for a in subparsers.choices[command]._actions if flag in a.option_strings]
    return action


@pytest.mark.parametrize(
    "command,flag,choices,default",
    [
        ("train", "--device", get_args(Device), None),  # None: the recipe's value stands
        ("train", "--amp", get_args(Amp), None),
        ("train", "--distillation", get_args(DistillKind), None),
        ("eval", "--device", get_args(Device), "auto"),
        ("eval", "--amp", get_args(Amp), "none"),
        ("predict", "--device", get_args(Device), "auto"),
        ("ablate", "--device", get_args(Device), "auto"),
        ("attention", "--device", get_args(DeviceType), "cpu"),
        ("residuals", "--device", get_args(DeviceType), "cpu"),
        ("bench", "--device", get_args(DeviceType), "cpu"),
        ("bench", "--attn-impl", get_args(AttnImpl), None),
        ("bench", "--dtype", tuple(DTYPES), "fp32"),
        ("bench", "--compare-dtype", tuple(DTYPES), None),
    ],
)
def test_choices_come_from_the_library(command, flag, choices, default):
    action = _option(command, flag)
    assert tuple(action.choices) == choices and action.default == default


def test_the_device_sets_are_nested():
    assert get_args(Device) == ("auto", *get_args(DeviceType))
    assert get_args(DeviceType) == ("cpu", "cuda") and get_args(Amp) == ("none", "bf16", "fp16")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--amp", "bogus"],
        ["train", "--distillation", "medium"],
        ["attention", "--checkpoint", "c.pt", "--output", "o", "--device", "auto", "x.png"],
        ["bench", "--model", "cait_tiny_32", "--attn-impl", "flash"],
    ],
)
def test_a_bad_choice_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_config_error_is_one_line_naming_the_config_key(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--output", str(tmp_path), "--teacher", "timm:x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cait train: error: distill.teacher is set") and "\n" not in err
    assert "distill.kind" in err and "--distillation" not in err
    assert main(["train", "--output", str(tmp_path), "--set", "optim.schedule=linear"]) == 2
    assert "optim.schedule must be one of ['cosine', 'step', 'constant']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_an_unreadable_safetensors_file_is_one_line(command, tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    image = tmp_path / "x.png"
    argv = [command, "--checkpoint", str(bad)] + (
        ["--data", "digits"] if command == "eval" else [str(image)]
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cait {command}: error: ") and "\n" not in err
    assert "is not a readable safetensors file" in err


def test_a_missing_checkpoint_is_not_found_not_a_missing_model_name(tmp_path, capsys):
    missing = tmp_path / "nope" / "model.safetensors"
    assert main(["eval", "--checkpoint", str(missing), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cait eval: error: checkpoint not found: {missing} (not a file, URL or Hub id)"
