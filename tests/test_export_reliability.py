"""`cait export` loses nothing (issue 28): ``--force`` replaces only an earlier export, one
process at a time writes an output, the temporaries of a killed export are removed by the
next, Ctrl-C leaves nothing behind, and a user's mistake ends in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize_

from cait.cli import main
from cait.export import export_model
from cait.export import formats as export_formats
from cait.export import harness as export_harness
from cait.files import OutputLock, atomic_write, temporary_path
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import checkpoint_metadata, model_spec, save_safetensors

NAME = "cait_digits_16"  # 16x16 images, patch 4
ARGS = {"depth": 1}
CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def model():
    return randomize_(create_model(NAME, **ARGS)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    metadata = checkpoint_metadata(
        model_spec(NAME, model, ARGS), get_variant(NAME).input_spec, CLASSES
    )
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    save_safetensors(model.state_dict(), path, metadata)
    return path


def _export(checkpoint: Path, fmt: str, output: Path, *extra: str) -> int:
    return main(["export", str(checkpoint), "--format", fmt, "--output", str(output), *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cait export: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _with_row(monkeypatch, name: str, **changes) -> export_formats.ExportFormat:
    """Change format ``name``'s row of the table for this test; returns the row as it was."""
    row = export_formats.get_format(name)
    monkeypatch.setattr(export_formats, "_FORMATS", dict(export_formats._FORMATS))
    export_formats._FORMATS[name] = dataclasses.replace(row, **changes)
    return row


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------ --force: an earlier export only


def test_force_replaces_an_earlier_timm_export(checkpoint, tmp_path):
    out = tmp_path / "hub"
    assert _export(checkpoint, "timm", out) == 0
    (out / "config.json").write_text("an earlier export's")  # a folder of what timm writes
    assert _export(checkpoint, "timm", out, "--force") == 0
    assert json.loads((out / "config.json").read_text())["architecture"] == "cait_xxs24_224"
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]


@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": "mine"},
        {"config.json": "{}", "model.safetensors": "weights", "train.log": "mine"},
        {"config.json": "{}", "runs/last.pt": "a checkpoint"},
    ],
)
def test_force_never_replaces_a_folder_of_other_files(checkpoint, tmp_path, capsys, files):
    out = tmp_path / "mine"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    assert _export(checkpoint, "timm", out, "--force") == 2
    err = _one_line_error(capsys)
    assert f"{out} holds what a timm export does not write" in err
    assert "refusing to replace it, even with --force" in err
    assert _tree(out) == files
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_a_timm_export_never_replaces_a_file(model, tmp_path):
    out = tmp_path / "weights.bin"
    out.write_text("not an export")
    with pytest.raises(ValueError, match="weights.bin is not a folder; format 'timm' writes a"):
        export_model(model, "timm", out, get_variant(NAME).input_spec, overwrite=True)
    assert out.read_text() == "not an export"


# ----------------------------------------------------------------- one writer per output


def test_a_second_export_to_the_same_output_is_refused(model, tmp_path, monkeypatch):
    out = tmp_path / "model.pt2"
    spec = get_variant(NAME).input_spec
    refusals: list[str] = []

    def write_while_another_starts(job, path):
        if not refusals:  # the first export, mid-write: a second one to the same output
            try:
                export_model(model, "pt2", out, spec, overwrite=True)
                refusals.append("none: both wrote")
            except ValueError as err:
                refusals.append(str(err))
        return pt2.write(job, path)

    pt2 = _with_row(monkeypatch, "pt2", write=write_while_another_starts)
    export_model(model, "pt2", out, spec)
    assert refusals == [refusals[0]], refusals
    assert f"{out} is in use by cait export (pid {os.getpid()} on" in refusals[0]
    assert refusals[0].endswith("one writer per output")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # the lock is gone too


def test_an_output_in_use_is_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "hub"
    with OutputLock(out, what="cait export"):
        assert _export(checkpoint, "timm", out) == 2
    assert "is in use by cait export" in _one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_the_lock_of_a_killed_export_is_taken_over(model, tmp_path, caplog):
    lock = tmp_path / ".model.pt2.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    export_model(model, "pt2", tmp_path / "model.pt2", get_variant(NAME).input_spec)
    assert "removing a stale lock" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


# ------------------------------------------------------------- temporaries of a killed export


@pytest.mark.parametrize(
    "fmt,name", [("onnx", "model.onnx"), ("pt2", "model.pt2"), ("timm", "hub")]
)
def test_the_next_export_removes_what_a_killed_one_left(model, tmp_path, fmt, name):
    out = tmp_path / name
    mine = temporary_path(out).name
    stale = tmp_path / mine.replace(f"-{os.getpid()}.tmp", f"-{_dead_pid()}.tmp")
    if fmt == "timm":  # a folder being filled
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half an export")
    else:
        stale.write_bytes(b"half an export")
    alive = tmp_path / mine.replace(f"-{os.getpid()}.tmp", f"-{os.getppid()}.tmp")
    alive.write_bytes(b"another export, still running")
    export_model(model, fmt, out, get_variant(NAME).input_spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, alive.name])


# ------------------------------------------------------------------------------------ Ctrl-C


def _ctrl_c_after(write):
    """``write``, then Ctrl-C: the export is written and not yet checked or in place."""

    def write_then_interrupt(job, path):
        details = write(job, path)
        signal.raise_signal(signal.SIGINT)
        return details

    return write_then_interrupt


@pytest.mark.parametrize("fmt,name", [("pt2", "model.pt2"), ("timm", "hub")])
def test_ctrl_c_during_an_export_leaves_the_earlier_output_and_nothing_else(
    model, tmp_path, monkeypatch, fmt, name
):
    out = tmp_path / name
    earlier = out / "config.json" if fmt == "timm" else out
    earlier.parent.mkdir(exist_ok=True)
    earlier.write_text("an earlier export")
    row = export_formats.get_format(fmt)
    _with_row(monkeypatch, fmt, write=_ctrl_c_after(row.write))
    with pytest.raises(KeyboardInterrupt):
        export_model(model, fmt, out, get_variant(NAME).input_spec, overwrite=True)
    assert earlier.read_text() == "an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary, no lock


def test_ctrl_c_in_cait_export_is_interrupted_with_nothing_written(
    checkpoint, tmp_path, monkeypatch, capsys
):
    _with_row(monkeypatch, "pt2", write=_ctrl_c_after(export_formats.get_format("pt2").write))
    assert _export(checkpoint, "pt2", tmp_path / "model.pt2") == 130
    assert capsys.readouterr().err.strip() == "cait export: interrupted"
    assert not list(tmp_path.iterdir())


def test_ctrl_c_during_the_rename_is_too_late_and_says_so(tmp_path, monkeypatch, caplog):
    """The write is complete: it is kept, and the interrupted call returns as finished."""
    rename = os.replace

    def interrupted_rename(src, dst):
        signal.raise_signal(signal.SIGINT)  # held until the rename is done
        rename(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_rename)
    out = tmp_path / "model.onnx"
    atomic_write(out, lambda tmp: tmp.write_text("complete"), interruptible=True)
    assert out.read_text() == "complete"
    assert f"Ctrl-C came as {out} was put in place: it is complete" in caplog.text


# ------------------------------------------------------------------------ one-line mistakes


@pytest.mark.parametrize("fmt", ["onnx", "timm"])
@pytest.mark.parametrize("output", [".", "..", "{tmp}/sub/.."])
def test_an_output_without_a_name_is_one_line(
    checkpoint, tmp_path, monkeypatch, capsys, fmt, output
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    output = output.format(tmp=tmp_path)
    assert _export(checkpoint, fmt, Path(output), "--force") == 2
    err = _one_line_error(capsys)
    assert f"the output {output!r} names a folder to write in, not what to write" in err, err
    example = "model.onnx" if fmt == "onnx" else "timm_model"
    assert f"give the {fmt} export a name, e.g. {Path(output) / example}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]


def test_an_opset_onnx_does_not_know_is_one_line_before_loading(
    checkpoint, tmp_path, monkeypatch, capsys, caplog
):
    import onnx

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(export_harness, "load_for_inference", no_loading)
    assert _export(checkpoint, "onnx", tmp_path / "m.onnx", "--opset", "99") == 2
    newest = onnx.defs.onnx_opset_version()
    assert (
        f"ONNX opset 99 does not exist yet: onnx {onnx.__version__} knows opsets up to {newest}"
        in _one_line_error(capsys)
    )
    assert not list(tmp_path.iterdir())


def test_an_opset_the_converter_cannot_reach_logs_no_traceback(
    checkpoint, tmp_path, capsys, caplog
):
    """onnxscript converts down from its opset 18; one it cannot reach (today the newest,
    for want of an adapter for Gelu) ends in our line, and its traceback is not logged."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    status = _export(checkpoint, "onnx", tmp_path / "m.onnx", "--opset", str(newest))
    assert [r for r in caplog.records if r.exc_info] == []
    if status == 2:
        assert (
            f"asked for ONNX opset {newest}, the exporter could only write opset"
            in _one_line_error(capsys)
        )
    else:
        assert status == 0 and f"opset {newest}" in capsys.readouterr().out
