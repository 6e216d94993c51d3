"""``cait convert`` replaces nothing without being asked, and with ``--force`` only what it
writes (issue 28)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import cait
from cait.cli import main as cli_main
from cait.files import OutputLock
from cait.models.build import convert_checkpoint

REFUSAL = "exists: refusing to replace it without --force"


@pytest.fixture
def official(tmp_path):
    path = tmp_path / "TINY.pth"
    torch.save({"model": cait.create_model("cait_tiny_32", depth=1).state_dict()}, path)
    return path


def _other_weights(path):
    save_file({"other": torch.ones(3)}, str(path))
    return path


def test_an_existing_destination_is_refused_in_one_line_and_kept(official, tmp_path, capsys):
    dst = _other_weights(tmp_path / "another_run.safetensors")
    assert cli_main(["convert", str(official), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err == f"cait convert: error: {dst} {REFUSAL}\n"
    assert list(load_file(str(dst))) == ["other"]
    with pytest.raises(ValueError, match="without `overwrite`"):
        convert_checkpoint(official, dst)


def test_force_replaces_a_safetensors_file(official, tmp_path):
    dst = _other_weights(tmp_path / "another_run.safetensors")
    assert cli_main(["convert", str(official), str(dst), "--force"]) == 0
    assert "blocks.0.gamma_1" in load_file(str(dst))
    assert sorted(os.listdir(tmp_path)) == ["TINY.pth", "another_run.safetensors"]  # no lock
    convert_checkpoint(official, dst, overwrite=True)  # the library's name for it


@pytest.mark.parametrize("kind", ["folder", "not_safetensors", "fifo"])
def test_force_never_replaces_what_convert_does_not_write(official, tmp_path, capsys, kind):
    dst = tmp_path / "x.safetensors"
    if kind == "folder":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    elif kind == "fifo":
        os.mkfifo(dst)
    else:
        dst.write_text("my notes, not weights")
    assert cli_main(["convert", str(official), str(dst), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("is a folder" if kind == "folder" else "refusing to replace it") in err
    if kind == "folder":
        assert (dst / "notes.txt").read_text() == "mine"
    elif kind == "fifo":
        assert dst.is_fifo()
    else:
        assert dst.read_text() == "my notes, not weights"


def test_a_second_writer_of_one_destination_is_refused(official, tmp_path):
    dst = tmp_path / "x.safetensors"
    lock = OutputLock(dst, what="cait convert")  # held by a process on another machine
    lock.path.write_text('{"pid": 1, "host": "elsewhere", "what": "cait convert"}')
    with pytest.raises(ValueError, match="in use by cait convert"):
        convert_checkpoint(official, dst)
    assert not dst.exists()
