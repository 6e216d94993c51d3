"""`cait export` loses nothing (issue 28): ``--force`` replaces only an earlier export, and
a user's mistake ends in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import randomize_

from cait.cli import main
from cait.export import export_model
from cait.models.build import checkpoint_metadata, model_spec
from cait.models.registry import create_model, get_variant
from cait.training.checkpoint import save_safetensors

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
