"""Checkpoint reading, strict loading, adaptation and conversion."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cait
from cait.cli import main as cli_main
from cait.models.build import load_for_inference
from cait.models.weights_file import checkpoint_metadata, model_spec, save_pt

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)


def tiny(**overrides) -> cait.CaiT:
    return cait.CaiT(cait.CaiTConfig(**{**TINY, **overrides})).eval()


def _same_logits(a, b, size=16):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def test_official_wrapper_and_prefixes_are_removed():
    src = tiny()
    wrapped = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}
    dst = tiny()
    report = cait.load_pretrained(dst, wrapped)
    assert report == cait.LoadReport()
    assert _same_logits(src, dst)


def test_another_variant_raises_one_line_naming_both_architectures(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(tiny(embed_dim=32, depth=3).state_dict(), path)
    with pytest.raises(ValueError) as info:
        cait.load_pretrained(tiny(), path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"checkpoint {path} does not match the model; model: embed_dim=24")
    assert "depth=2" in text and "checkpoint: embed_dim=32" in text and "depth=3" in text
    assert "cls_token has shape (1, 1, 32) in the file but (1, 1, 24) in the model" in text
    assert "more tensors differ" in text


def test_strict_load_names_a_mis_shaped_tensor_and_both_shapes_in_one_line():
    sd = tiny().state_dict()
    sd["blocks.0.gamma_1"] = torch.ones(7)
    with pytest.raises(ValueError) as info:
        cait.load_pretrained(tiny(), sd)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("checkpoint state dict does not match the model; model: ")
    assert text.endswith("; blocks.0.gamma_1 has shape (7,) in the file but (24,) in the model")


def test_missing_keys_are_named_and_non_strict_loads_the_rest(caplog):
    src = tiny()
    sd = src.state_dict()
    del sd["blocks.1.attn.proj_l.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj_l\.weight is missing from"):
        cait.load_pretrained(tiny(), sd)
    dst = tiny()
    with caplog.at_level(logging.WARNING, logger="cait.models.pretrained"):
        report = cait.load_pretrained(dst, sd, strict=False)
    assert report.missing == ["blocks.1.attn.proj_l.weight"]
    assert "missing keys: blocks.1.attn.proj_l.weight" in caplog.text
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_other_class_count_reinitialises_the_head(caplog):
    src = tiny(num_classes=1000)
    dst = tiny(num_classes=10)
    with caplog.at_level(logging.INFO, logger="cait.models.pretrained"):
        report = cait.load_pretrained(dst, src.state_dict())
    assert report.reset_head
    assert "checkpoint head has 1000 classes, model has 10: head re-initialised" in caplog.text
    assert dst.head.weight.shape == (10, 24)
    torch.testing.assert_close(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.all(dst.head.bias == 0)


def test_pos_embed_resized_at_load():
    src = tiny()
    dst = tiny(img_size=24)
    report = cait.load_pretrained(dst, src.state_dict())
    assert report.resized_pos_embed == (4, 6)
    assert dst.pos_embed.shape == (1, 36, 24)
    # the model at 24 after load equals the 16 model fed a 24 input (resized on the fly)
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


class NotATensor:
    pass


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": NotATensor()}}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        cait.load_pretrained(tiny(), path)


def test_missing_file_and_non_tensor_entries(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cait.load_pretrained(tiny(), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not a tensor"):
        cait.load_pretrained(tiny(), collections.OrderedDict(a=1))


def test_convert_cli_round_trip(tmp_path):
    src = cait.create_model("cait_tiny_32", depth=2).eval()
    official = tmp_path / "TINY.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, official)
    out = tmp_path / "tiny.safetensors"
    assert cli_main(["convert", str(official), str(out)]) == 0
    tensors = load_file(str(out))
    assert "blocks.0.gamma_1" in tensors and not any(k.startswith("module.") for k in tensors)
    dst = cait.create_model("cait_tiny_32", depth=2).eval()
    cait.load_pretrained(dst, out)
    assert _same_logits(src, dst, size=32)


def test_convert_records_the_source_and_the_checked_variant(tmp_path):
    official = tmp_path / "TINY.pth"
    torch.save({"model": cait.create_model("cait_tiny_32").state_dict()}, official)
    out = tmp_path / "tiny.safetensors"
    assert cli_main(["convert", str(official), str(out), "--model", "cait_tiny_32"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "TINY.pth", "model": "cait_tiny_32"}
    cait.convert_checkpoint(official, tmp_path / "plain.safetensors")
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "TINY.pth"}


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _run_checkpoint(path: Path) -> Path:
    """A last.pt as a run writes it: 3 classes with names of their own, an eval crop and
    statistics that are not the variant's."""
    model = cait.create_model("cait_digits_16", num_classes=3, embed_dim=16, depth=1)
    inputs = cait.get_variant("cait_digits_16").input_spec.replace(
        crop_pct=0.9, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)
    )
    meta = checkpoint_metadata(model_spec("cait_digits_16", model, {}), inputs, ["x", "y", "z"])
    save_pt(model.state_dict(), path, meta, run={"config": {}, "epoch": 0})
    return path


@pytest.mark.parametrize("layout", ["today", "pre_seams"])
def test_convert_keeps_a_run_checkpoints_class_names_and_inputs(tmp_path, layout):
    """cait convert of a run's last.pt (issue 28): predict then prints the same labels."""
    src = (
        _run_checkpoint(tmp_path / "last.pt")
        if layout == "today"
        else FIXTURES / layout / "last.pt"
    )
    out = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(src), str(out)]) == 0
    before, after = load_for_inference(str(src)), load_for_inference(str(out))
    assert after.class_names == before.class_names and after.settings == before.settings
    size = before.settings.img_size
    assert _same_logits(before.model, after.model, size=size)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["source"] == "last.pt"


def test_convert_of_a_run_checkpoint_refuses_another_model_name(tmp_path, capsys):
    src = _run_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "x.safetensors"
    assert cli_main(["convert", str(src), str(out), "--model", "cait_tiny_32"]) == 2
    err = capsys.readouterr().err
    assert "last.pt holds a checkpoint of cait_digits_16, not of cait_tiny_32" in err
    assert not out.exists()
    assert cli_main(["convert", str(src), str(out), "--model", "cait_digits_16"]) == 0
    assert load_for_inference(str(out)).class_names == ["x", "y", "z"]


def test_convert_cli_refuses_weights_of_another_model(tmp_path, capsys):
    official = tmp_path / "TINY.pth"
    torch.save({"model": cait.create_model("cait_tiny_32").state_dict()}, official)
    out = tmp_path / "x.safetensors"
    assert cli_main(["convert", str(official), str(out), "--model", "cait_small_32"]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert not out.exists()


def test_models_cli_lists_the_table(capsys):
    assert cli_main(["models", "cait_xxs*"]) == 0
    out = capsys.readouterr().out
    assert "cait_xxs24_224" in out and "78.40" in out and "cait_s24_224" not in out


def test_url_and_hub_sources_are_routed_without_network(tmp_path, monkeypatch):
    """URLs go through torch.hub's cache (weights_only), Hub ids through hf_hub_download."""
    src = tiny()
    official = tmp_path / "official.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, official)
    seen = {}

    def fake_from_url(url, map_location=None, weights_only=False, check_hash=False):
        seen["url"], seen["weights_only"] = url, weights_only
        return torch.load(official, map_location=map_location, weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_from_url)
    dst = tiny()
    cait.load_pretrained(dst, "https://example.org/TINY.pth")
    assert seen == {"url": "https://example.org/TINY.pth", "weights_only": True}
    assert _same_logits(src, dst)

    import huggingface_hub
    from safetensors.torch import save_file

    hub_file = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(hub_file))
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo_id, filename: seen.update(repo=repo_id, file=filename) or str(hub_file),
    )
    dst = tiny()
    cait.load_pretrained(dst, "hf-hub:timm/tiny.test")
    assert seen["repo"] == "timm/tiny.test" and seen["file"] == "model.safetensors"
    assert _same_logits(src, dst)


def test_create_model_pretrained_uses_the_variant_url(monkeypatch):
    src = cait.create_model("cait_xxs24_224", depth=1)
    urls = []

    def fake_from_url(url, **kwargs):
        urls.append(url)
        return {"model": {"module." + k: v for k, v in src.state_dict().items()}}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_from_url)
    model = cait.create_model("cait_xxs24_224", pretrained=True, depth=1)
    assert urls == ["https://dl.fbaipublicfiles.com/deit/XXS24_224.pth"]
    torch.testing.assert_close(model.pos_embed, src.pos_embed)
    with pytest.raises(ValueError, match="no released weights"):
        cait.create_model("cait_tiny_32", pretrained=True)


def test_a_missing_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cait.load_pretrained(tiny(), "weights/XXS24_224.pth")
