"""The CLI's closed choices are the library's Literals; its errors are one line."""

from __future__ import annotations

import argparse
import sys
from typing import get_args

import pytest

from cait.bench import DTYPES
from cait.cli import build_parser, main
from cait.cli.train import _TRAIN_FLAGS, train_config_from_args
from cait.models.config import AttnImpl
from cait.runtime import Amp, Device, DeviceType
from cait.training.config import DistillKind, TrainConfig
from cait.training.engine import NonFiniteLossError
from cait.training.preemption import TrainingInterrupted, TrainingPreempted


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


def test_cait_app_without_gradio_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without [app] has
    monkeypatch.delitem(sys.modules, "cait.app", raising=False)
    assert main(["app", "--checkpoint", str(tmp_path / "model.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cait app: error: cait app needs `pip install cait[app]`")
    assert "\n" not in err


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_help_and_shows_its_default():
    config = TrainConfig().to_dict()

    def config_default(key: str):
        value = config
        for part in key.split("."):
            value = value[part]
        return value

    def shows_a_default(value) -> bool:
        # by identity: 0 == False, so `value not in (None, False)` skipped defaults of 0
        return not (value is None or value is False or value == [])

    missing, no_default = [], []
    for name, command in _commands().items():
        assert command.description and command.epilog.startswith("examples:"), name
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = action.option_strings[-1]
            if not action.help:
                missing.append(f"{name} {flag}")
                continue
            text = formatter._expand_help(action)
            has_default = shows_a_default(action.default)
            if name == "train" and action.dest in _TRAIN_FLAGS:
                # train's flags default to the recipe's value, else the config's
                has_default = shows_a_default(config_default(_TRAIN_FLAGS[action.dest]))
            if has_default and "default" not in text:
                no_default.append(f"{name} {flag}")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"defaults not shown: {no_default}"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("cait ")


def test_a_negative_topk_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "x.png", "--topk", "-1"])
    assert done.value.code == 2
    assert "--topk: expected an integer >= 1, got -1" in capsys.readouterr().err


def test_a_zero_flag_overrides_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 7\ndata: {workers: 10}\n")
    args = build_parser().parse_args(["train", "--recipe", str(recipe), "--workers", "0"])
    args.argv = []
    config = train_config_from_args(args)
    assert config.data.workers == 0 and config.seed == 7
    args = build_parser().parse_args(["train", "--recipe", str(recipe), "--seed", "0"])
    assert train_config_from_args(args).seed == 0


@pytest.mark.parametrize(
    "flags,earlier_run,writes,hint",
    [
        # Ctrl-C before this run's first checkpoint: an earlier run's last.pt stays, and
        # with --overwrite it is the run the user meant to replace, not one to resume
        (["--overwrite"], True, False, "left as it was (nothing replaced)"),
        (["--overwrite"], True, True, "holds the run's last checkpoint: continue with"),
        # continuing a run: its last.pt is this run's, written by an earlier process
        (["--resume", "auto"], True, False, "holds the run's last checkpoint: continue with"),
        ([], False, False, "no checkpoint was written yet"),
    ],
)
def test_ctrl_c_in_train_says_what_the_output_folder_holds(
    flags, earlier_run, writes, hint, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    if earlier_run:
        (out / "last.pt").write_bytes(b"the earlier run's checkpoint")

    def interrupted_run(config, info, watch):  # the run inside train(), interrupted
        if writes:  # as save_checkpoint does: a new file renamed over the old one
            (out / "last.tmp").write_bytes(b"this run's checkpoint")
            (out / "last.tmp").replace(out / "last.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr("cait.training.run._train", interrupted_run)
    assert main(["train", "--data", "digits", "--output", str(out), *flags]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("cait train: interrupted; ") and hint in err
    assert ("--resume auto" in err) == ("continue with" in hint)


def test_ctrl_c_in_ablate_is_one_word(tmp_path, monkeypatch, capsys):
    # rerunning the same `cait ablate` resumes its runs: training's --resume hint is not shown
    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(f"{tmp_path}/last.pt holds the run's last checkpoint: ...")

    monkeypatch.setattr("cait.analysis.ablation.run_ablation", interrupted)
    assert main(["ablate", "--grid", "tiny", "--output", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "cait ablate: interrupted"


@pytest.mark.parametrize(
    "stop, status, line",
    [
        (TrainingPreempted("stopped by SIGTERM at step 3"), 75, "stopped by SIGTERM at step 3"),
        (NonFiniteLossError("loss became nan in epoch 2"), 2, "error: loss became nan in epoch 2"),
    ],
)
def test_training_stops_are_an_exit_status_and_one_line(
    stop, status, line, tmp_path, monkeypatch, capsys
):
    def stopped_run(config, info, watch):
        raise stop

    monkeypatch.setattr("cait.training.run._train", stopped_run)
    assert main(["train", "--data", "digits", "--output", str(tmp_path)]) == status
    assert capsys.readouterr().err.strip() == f"cait train: {line}"
