"""``cait attention`` and ``cait residuals`` follow the run-folder rules (issue 28): earlier
outputs are replaced only with ``--force``, a folder holding other files never, one writer
per output, and a failure leaves the earlier outputs as they were."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

import cait
from cait.analysis.attention import SABlockOutOfRange, save_attention_maps
from cait.analysis.residuals import save_residual_report
from cait.cli import main as cli_main
from cait.files import OutputLock, temporary_path
from cait.models import InputSpec
from cait.models.build import LoadedModel

GREY = InputSpec(16, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
REFUSAL = "exists: refusing to replace it without --force"


def _image(path, shade=128):
    Image.new("RGB", (16, 16), (shade, shade, shade)).save(path)
    return str(path)


def _loaded() -> LoadedModel:
    return LoadedModel(cait.create_model("cait_digits_16", depth=1).eval(), GREY, None, None)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "digits.pth"
    torch.save(cait.create_model("cait_digits_16").state_dict(), path)
    return str(path)


def _attention(weights, out, *images, force=False):
    args = ["attention", "--checkpoint", weights, "--model", "cait_digits_16", *images]
    return cli_main([*args, "--output", str(out), *(["--force"] if force else [])])


def _residuals(weights, out, force=False):
    args = ["residuals", "--checkpoint", weights, "--model", "cait_digits_16", "--data"]
    args += ["digits", "--num-images", "4", "--batch-size", "4", "--no-progress"]
    return cli_main([*args, "--output", str(out), *(["--force"] if force else [])])


def test_attention_replaces_earlier_maps_only_with_force(tmp_path, weights, capsys):
    out = tmp_path / "maps"
    a, b = _image(tmp_path / "a.png", 10), _image(tmp_path / "b.png", 200)
    assert _attention(weights, out, a) == 0
    before = (out / "a_class_attention.png").read_bytes()
    capsys.readouterr()

    assert _attention(weights, out, b) == 2
    assert capsys.readouterr().err.startswith(f"cait attention: error: {out} {REFUSAL} (")
    assert sorted(os.listdir(out)) == ["a_class_attention.npy", "a_class_attention.png"]
    assert (out / "a_class_attention.png").read_bytes() == before

    assert _attention(weights, out, b, force=True) == 0
    # the folder is replaced whole: the earlier image's maps go
    assert sorted(os.listdir(out)) == ["b_class_attention.npy", "b_class_attention.png"]
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "digits.pth", "maps"]  # no lock


def test_residuals_replace_an_earlier_report_only_with_force(tmp_path, weights, capsys):
    out = tmp_path / "report"
    assert _residuals(weights, out) == 0
    csv_before = (out / "residuals.csv").read_text()
    (out / "residuals.csv").write_text("mine")
    capsys.readouterr()
    assert _residuals(weights, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cait residuals: error: {out} {REFUSAL} (") and err.count("\n") == 1
    assert (out / "residuals.csv").read_text() == "mine"
    assert _residuals(weights, out, force=True) == 0
    assert (out / "residuals.csv").read_text() == csv_before


@pytest.mark.parametrize("command", ["attention", "residuals"])
def test_a_folder_holding_other_files_is_refused_even_with_force(
    tmp_path, weights, capsys, command
):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "x_class_attention.png").write_text("an earlier map")
    (out / "residuals.csv").write_text("an earlier report")
    if command == "attention":
        status = _attention(weights, out, _image(tmp_path / "a.png"), force=True)
    else:
        status = _residuals(weights, out, force=True)
    assert status == 2
    err = capsys.readouterr().err
    assert f"{out} holds what cait {command} does not write (notes.txt" in err
    assert "even with --force" in err and err.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert len(os.listdir(out)) == 3


@pytest.mark.parametrize("command", ["attention", "residuals"])
def test_a_second_writer_of_one_output_is_refused(tmp_path, weights, capsys, command):
    out = tmp_path / "out"
    # held by a process on another machine (a live one here would be alive too)
    OutputLock(out).path.write_text('{"pid": 1, "host": "elsewhere", "what": "cait x"}')
    if command == "attention":
        status = _attention(weights, out, _image(tmp_path / "a.png"))
    else:
        status = _residuals(weights, out)
    assert status == 2
    assert f"{out} is in use by cait x (pid 1 on elsewhere" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_write_leaves_the_earlier_maps_and_nothing_else(tmp_path):
    out = tmp_path / "maps"
    image = _image(tmp_path / "a.png")
    save_attention_maps(_loaded(), [image], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SABlockOutOfRange):  # found while drawing, after the folder was begun
        save_attention_maps(_loaded(), [image], out, sa_block=5, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["a.png", "maps"]


def test_ctrl_c_while_measuring_leaves_the_earlier_report(tmp_path, monkeypatch):
    out = tmp_path / "report"
    save_residual_report([_loaded()], "digits", out, num_images=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cait.analysis.residuals.plot_residual_ratios", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_residual_report([_loaded()], "digits", out, num_images=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_what_a_killed_writer_left_is_removed_by_the_next(tmp_path):
    out = tmp_path / "maps"
    left = temporary_path(out)
    dead = left.with_name(left.name.replace(f"-{os.getpid()}.", "-4194303."))  # no such pid
    dead.mkdir()
    (dead / "a_class_attention.png").write_text("half")
    save_attention_maps(_loaded(), [_image(tmp_path / "a.png")], out)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "maps"]


@pytest.mark.parametrize("output", [".", "file"])
def test_an_output_that_is_not_a_folder_of_its_own_is_refused(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="not a folder|not the folder"):
        save_residual_report([_loaded()], "digits", output, num_images=2)
    assert sorted(os.listdir(tmp_path)) == ["file"]
