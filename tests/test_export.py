"""`cait export`: ONNX and torch.export programs and timm folders give the eager model's logits.

Every export is checked here independently of the checks the exporter runs itself: the ONNX
file in onnxruntime, the .pt2 file through ``torch.export.load``, the timm folder through
``timm.create_model("local-dir:...")``. The models are tiny, with random weights that make
every block count (``randomize_``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import randomize_
from safetensors.torch import load_file

from cait import export as export_module
from cait.cli import main
from cait.export import PARITY_BATCHES, ExportError, export_model
from cait.export import formats as export_formats
from cait.models.build import load_for_inference
from cait.models.registry import create_model, get_variant
from cait.models.timm_interop import timm_architecture
from cait.models.weights_file import checkpoint_metadata, model_spec, save_safetensors

NAME = "cait_digits_16"  # 16x16 images, patch 4: a 4x4 grid
ARGS = {"depth": 2}  # the default talking-heads path (attn_impl="fast")
CLASSES = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A model.safetensors with its metadata, as a training run writes it."""
    model = randomize_(create_model(NAME, **ARGS))
    metadata = checkpoint_metadata(
        model_spec(NAME, model, ARGS), get_variant(NAME).input_spec, CLASSES
    )
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    save_safetensors(model.state_dict(), path, metadata)
    return path


def _eager(checkpoint: Path) -> torch.nn.Module:
    return load_for_inference(str(checkpoint)).model


def _images(batch: int, size: tuple[int, int] = (16, 16), seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _one_line_error(capsys, prefix: str = "cait export: error: ") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------ onnx


def test_onnx_export_runs_in_onnxruntime_with_the_eager_logits(checkpoint, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batch 1 at 16x16" in printed and "batch 7 at 16x16" in printed, printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and outp.name == "logits"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 16, 16]  # batch symbolic
    model = _eager(checkpoint)
    for batch in (1, 7):
        x = _images(batch)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            want = model(x)
        assert got.shape == (batch, 10)
        diff = (torch.from_numpy(got) - want).abs().max().item()
        assert diff <= 1e-4, (batch, diff)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_onnx_dynamic_size_takes_other_heights_and_widths(tmp_path):
    import onnxruntime

    model = randomize_(create_model(NAME, depth=1)).eval()
    out = tmp_path / "model.onnx"
    result = export_model(model, "onnx", out, get_variant(NAME).input_spec, dynamic_size=True)
    assert result.dynamic_size and {c.size for c in result.checks} == {(16, 16), (24, 24)}
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, size in ((1, (16, 16)), (7, (20, 28)), (2, (8, 12))):  # 8x12: a smaller grid
        x = _images(batch, size)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            diff = (torch.from_numpy(got) - model(x)).abs().max().item()
        assert diff <= 1e-4, (batch, size, diff)


def test_an_opset_the_exporter_cannot_write_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = ["export", str(checkpoint), "--format", "onnx", "--output", str(out), "--opset", "11"]
    assert main(argv) == 2
    assert "the opset must be at least 17" in _one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- pt2


def test_pt2_export_runs_at_batch_1_and_7(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert main(["export", str(checkpoint), "--format", "pt2", "--output", str(out)]) == 0
    assert "batch 7 at 16x16" in capsys.readouterr().out
    program = torch.export.load(out).module()
    model = _eager(checkpoint)
    for batch in (1, 7):
        x = _images(batch)
        with torch.no_grad():
            diff = (program(x) - model(x)).abs().max().item()
        assert diff <= 1e-4, (batch, diff)


def test_pt2_dynamic_size_runs_at_any_batch_and_size(checkpoint, tmp_path):
    """One program for free batch, height and width: batch 1 and 7, the model's size and
    sizes never traced (torch's 0/1 specialisation would otherwise reject batch 1)."""
    out = tmp_path / "model.pt2"
    argv = ["export", str(checkpoint), "--format", "pt2", "--output", str(out), "--dynamic-size"]
    assert main(argv) == 0
    program, model = torch.export.load(out).module(), _eager(checkpoint)
    for batch, size in ((1, (16, 16)), (7, (16, 16)), (1, (24, 20)), (7, (32, 8))):
        x = _images(batch, size)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max().item() <= 1e-4, (batch, size)


# ------------------------------------------------------------------------------------ timm

TIMM_CASES = {
    # name: (our variant, overrides, timm class, architecture[, the model's global_pool])
    "cait": (NAME, ARGS, timm.models.cait.Cait, "cait_xxs24_224"),
    "cait_avg_pool": (NAME, ARGS, timm.models.cait.Cait, "cait_xxs24_224", "avg"),
    "deit": (
        "deit_tiny_patch16_224",
        {"depth": 2, "img_size": 32},
        timm.models.vision_transformer.VisionTransformer,
        "deit_tiny_patch16_224",
    ),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        {"depth": 2, "img_size": 32, "num_classes": 5},
        timm.models.deit.VisionTransformerDistilled,
        "deit_tiny_distilled_patch16_224",
    ),
    "deit_layerscale": (
        "deit_tiny_patch16_224",
        {"depth": 2, "img_size": 32, "branch_scale": "layerscale", "init_scale": 0.1},
        timm.models.vision_transformer.VisionTransformer,
        "deit_tiny_patch16_224",
    ),
    "avg_pooling_no_class_token": (
        "deit_tiny_patch16_224",
        {"depth": 2, "img_size": 32, "class_token": "late", "pooling": "avg"},
        timm.models.vision_transformer.VisionTransformer,
        "deit_tiny_patch16_224",
    ),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_folder_builds_timms_model_with_our_logits(case, tmp_path):
    name, overrides, timm_class, architecture, *pool = TIMM_CASES[case]
    model = create_model(name, **overrides)
    if pool:
        model.reset_classifier(model.num_classes, global_pool=pool[0])
    model = randomize_(model).eval()
    spec = get_variant(name).input_spec.replace(img_size=model.config.img_size)
    out = tmp_path / "hub"
    result = export_model(model, "timm", out, spec)
    assert result.architecture == architecture and result.max_abs_diff <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(theirs) is timm_class and theirs.global_pool == model.global_pool
    # the weights carry timm's own names, every one of them
    assert set(load_file(out / "model.safetensors")) == set(theirs.state_dict())
    x = _images(3, (spec.img_size, spec.img_size))
    with torch.no_grad():
        diff = (theirs(x) - model(x)).abs().max().item()
    assert diff <= 1e-5, diff
    config = json.loads((out / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert config["num_classes"] == model.num_classes == theirs.num_classes
    assert cfg["input_size"] == [3, spec.img_size, spec.img_size]
    assert (cfg["crop_pct"], cfg["interpolation"]) == (spec.crop_pct, spec.interpolation)
    assert (cfg["mean"], cfg["std"]) == (list(spec.mean), list(spec.std))
    assert theirs.pretrained_cfg["crop_pct"] == spec.crop_pct  # timm reads them back


def test_timm_folder_from_a_checkpoint_carries_its_class_names(checkpoint, tmp_path, capsys):
    out = tmp_path / "hub"
    assert main(["export", str(checkpoint), "--format", "timm", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timm cait_xxs24_224" in printed and "batch 7 at 16x16" in printed, printed
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the digits' normalisation
    assert config["model_args"]["depth"] == 2 and config["model_args"]["patch_size"] == 4


def test_timm_dynamic_size_for_deit_and_a_clear_no_for_cait(checkpoint, tmp_path, capsys):
    model = randomize_(create_model("deit_tiny_patch16_224", depth=1, img_size=32)).eval()
    spec = get_variant("deit_tiny_patch16_224").input_spec.replace(img_size=32)
    export_model(model, "timm", tmp_path / "deit", spec, dynamic_size=True)
    theirs = timm.create_model(f"local-dir:{tmp_path / 'deit'}", pretrained=True).eval()
    x = _images(2, (48, 64))
    with torch.no_grad():
        assert (theirs(x) - model(x)).abs().max().item() <= 1e-5
    argv = ["export", str(checkpoint), "--format", "timm", "--output", str(tmp_path / "cait")]
    assert main([*argv, "--dynamic-size"]) == 2
    assert "timm's Cait takes one input size" in _one_line_error(capsys)
    assert not (tmp_path / "cait").exists()


@pytest.mark.parametrize(
    "variant,overrides,global_pool,lacking",
    [
        (NAME, {"distilled": True}, None, "a distillation token in the class-attention stage"),
        (NAME, {"branch_scale": "rezero"}, None, "branch_scale='rezero'"),
        (NAME, {"talking_heads": False}, None, "class attention with plain"),
        (NAME, {"pooling": "avg", "ca_depth": 0}, None, "talking heads without a class-attent"),
        ("deit_tiny_distilled_patch16_224", {}, "", "a distillation token read with global_p"),
    ],
)
def test_timm_refuses_what_it_cannot_express(variant, overrides, global_pool, lacking):
    config = get_variant(variant).config.replace(**overrides)
    with pytest.raises(ValueError, match="timm has no model with") as info:
        timm_architecture(config, global_pool)
    assert lacking in str(info.value) and "--format onnx or --format pt2" in str(info.value)


def test_a_failed_check_leaves_the_previous_output_as_it_was(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "config.json").write_text("previous")
    monkeypatch.setitem(export_module.TOLERANCES, "timm", -1.0)  # every check fails
    model = load_for_inference(str(checkpoint))
    with pytest.raises(ExportError, match="differs from the model by"):
        export_model(model.model, "timm", out, model.settings, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]  # no temporary folder left
    assert (out / "config.json").read_text() == "previous"


# ------------------------------------------------------------------------------------- Hub


class _FakeHfApi:
    calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/cait/commit/1"})


def test_push_to_hub_uploads_the_checked_folder(checkpoint, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHfApi)
    monkeypatch.setattr(_FakeHfApi, "calls", [])
    out = tmp_path / "hub"
    argv = ["export", str(checkpoint), "--format", "timm", "--output", str(out)]
    assert main([*argv, "--push-to-hub", "me/cait"]) == 0
    assert _FakeHfApi.calls == [
        ("create_repo", {"repo_id": "me/cait", "repo_type": "model", "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": "me/cait",
                "folder_path": str(out),
                "repo_type": "model",
                "files": ["config.json", "model.safetensors"],
            },
        ),
    ]
    assert "pushed to https://huggingface.co/me/cait/commit/1" in capsys.readouterr().out


def test_push_to_hub_needs_the_timm_format_and_a_valid_repo(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = ["export", str(checkpoint), "--output", str(out)]
    assert main([*argv, "--format", "onnx", "--push-to-hub", "me/cait"]) == 2
    assert "pushing to the Hub needs the timm format" in _one_line_error(capsys)
    assert main([*argv, "--format", "timm", "--push-to-hub", "not a repo!"]) == 2
    assert "invalid Hub repo id 'not a repo!'" in _one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_a_failed_upload_is_one_line_and_keeps_the_folder(
    checkpoint, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    class Offline(_FakeHfApi):
        def create_repo(self, **kwargs):
            raise ConnectionError("no network\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    out = tmp_path / "hub"
    argv = ["export", str(checkpoint), "--format", "timm", "--output", str(out)]
    assert main([*argv, "--push-to-hub", "me/cait"]) == 2
    err = _one_line_error(capsys)
    assert "could not upload" in err and "ConnectionError: no network" in err
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------- bad input


def test_an_unknown_format_is_a_usage_error(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", str(checkpoint), "--format", "tflite", "--output", str(tmp_path / "m")])
    assert info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    files = {
        "text": folder / "notes.pt",
        "list": folder / "list.pt",
        "wrong_shape": folder / "other.pt",
        "text_safetensors": folder / "notes.safetensors",
        "truncated": folder / "truncated.pt",
    }
    files["text"].write_text("not a checkpoint\n")
    files["text_safetensors"].write_text("not a checkpoint\n")
    torch.save([torch.zeros(2), torch.ones(2)], files["list"])
    torch.save(create_model(NAME, depth=1, embed_dim=48).state_dict(), files["wrong_shape"])
    whole = files["wrong_shape"].read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])  # a download cut short
    return files


@pytest.mark.parametrize(
    "source,extra,message",
    [
        ("text", ["--model", NAME], "is not a torch checkpoint (neither a zip archive nor"),
        ("truncated", ["--model", NAME], "is not a torch checkpoint: torch cannot read it"),
        ("text_safetensors", [], "is not a readable safetensors file"),
        ("list", [], "is not a cait checkpoint (it carries no model config): pass --model NAME"),
        ("list", ["--model", NAME], "expected a state dict (a mapping of names to tensors)"),
        ("wrong_shape", ["--model", NAME], "does not match the model; model:"),
        ("missing", [], "checkpoint not found"),
        ("missing", ["--model", NAME], "checkpoint not found"),
    ],
)
def test_a_checkpoint_that_is_not_a_model_is_one_line(
    bad_files, source, extra, message, tmp_path, capsys
):
    path = bad_files.get(source, tmp_path / "missing.pt")
    out = tmp_path / "model.onnx"
    assert main(["export", str(path), "--format", "onnx", "--output", str(out), *extra]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--format", "pt2", "--output", "{tmp}/model.onnx"], "must end with .pt2"),
        (["--format", "pt2", "--output", "{tmp}/m.pt2", "--opset", "18"], "an opset is ONNX's"),
        (["--format", "onnx", "--output", "{tmp}/m.onnx", "--batch", "1"], "at least 2"),
        (["--format", "onnx", "--output", "{tmp}"], "is a folder"),
    ],
)
def test_bad_options_are_one_line_before_anything_runs(checkpoint, tmp_path, argv, message, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["export", str(checkpoint), *argv]) == 2
    assert message in _one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_an_existing_output_is_replaced_only_with_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "config.json").write_text("previous")
    argv = ["export", str(checkpoint), "--format", "timm", "--output", str(out)]
    assert main(argv) == 2
    assert "exists: refusing to replace it without --force" in _one_line_error(capsys)
    assert (out / "config.json").read_text() == "previous"
    assert main([*argv, "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["architecture"] == "cait_xxs24_224"
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]  # no temporary or old folder left


# ------------------------------------------------------------------------------- the table


def _write_state_dict(job, path: Path) -> dict:
    torch.save(job.model.state_dict(), path)
    return {}


def _load_state_dict(path: Path) -> torch.nn.Module:
    model = create_model(NAME, **ARGS).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def test_a_format_is_one_entry_in_the_table_and_one_function(tmp_path, monkeypatch):
    """A format registered in the table, with nothing else naming it, is exported, checked
    and refused like the built-in ones."""
    monkeypatch.setattr(export_formats, "_FORMATS", dict(export_formats._FORMATS))  # restored
    export_formats.register_format(
        export_formats.ExportFormat(
            "state_dict",
            export_formats.File(".sd"),
            tolerance=0.0,
            options=frozenset(),
            write=_write_state_dict,
            load=_load_state_dict,
            reference="torch.load",
        )
    )
    model = randomize_(create_model(NAME, **ARGS)).eval()
    spec = get_variant(NAME).input_spec
    out = tmp_path / "model.sd"
    result = export_model(model, "state_dict", out, spec)
    assert (result.format, result.output, result.reference) == ("state_dict", out, "torch.load")
    assert [c.batch for c in result.checks] == list(PARITY_BATCHES) and result.max_abs_diff == 0
    written = torch.load(out, weights_only=True)
    assert written.keys() == model.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["model.sd"]  # no temporary file left
    # the table's rules reach it: its suffix, the options it does not take, its tolerance
    with pytest.raises(ValueError, match="a state_dict file must end with .sd, got"):
        export_model(model, "state_dict", tmp_path / "model.pt", spec)
    with pytest.raises(ValueError, match="dynamic height and width mean nothing for it"):
        export_model(model, "state_dict", tmp_path / "other.sd", spec, dynamic_size=True)
    export_module.TOLERANCES["state_dict"] = -1.0  # in the table's copy, as the row's own
    with pytest.raises(ExportError, match="torch.load differs from the model by 0.00e"):
        export_model(model, "state_dict", out, spec, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.sd"]


def test_a_format_name_is_registered_once():
    with pytest.raises(ValueError, match="an export format named 'onnx' is already registered"):
        export_formats.register_format(export_formats.get_format("onnx"))


def test_importing_export_imports_no_exporter_or_timm():
    """The CLI's help imports FORMATS and DEFAULT_EXAMPLE_BATCH from cait.export."""
    heavy = ["onnx", "onnxscript", "onnxruntime", "timm", "torchvision", "matplotlib"]
    code = f"import sys, cait.export; print([m for m in {heavy} if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    argv = [sys.executable, "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout
