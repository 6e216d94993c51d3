"""Parity with timm, the reference implementation: parameter counts, logits, resolutions."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import randomize_
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import cait

RELEASED = [
    "cait_xxs24_224",
    "cait_xxs24_384",
    "cait_xxs36_224",
    "cait_xxs36_384",
    "cait_xs24_384",
    "cait_s24_224",
    "cait_s24_384",
    "cait_s36_384",
    "cait_m36_384",
    "cait_m48_448",
]
DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224"]
# The default suite runs the variants that take a few seconds on 2 CPU cores.
SLOW = {
    "cait_xxs36_384",
    "cait_xs24_384",
    "cait_s24_384",
    "cait_s36_384",
    "cait_m36_384",
    "cait_m48_448",
}
TOL = 1e-4


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", RELEASED + DEIT)
def test_parameter_count_equals_timm(name):
    with torch.device("meta"):
        ours = cait.create_model(name)
        ref = timm.create_model(name)
    assert _count(ours) == _count(ref)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    variant = cait.get_variant(name)
    assert _count(ours) / 1e6 == pytest.approx(variant.params_m, abs=0.005)


def _write_formats(state_dict: dict, tmp_path) -> dict:
    """The same weights as timm's plain state dict, the official format and safetensors."""
    files = {
        "plain": tmp_path / "plain.pth",
        "official": tmp_path / "official.pth",
        "safetensors": tmp_path / "model.safetensors",
    }
    torch.save(state_dict, files["plain"])
    torch.save({"model": {"module." + k: v for k, v in state_dict.items()}}, files["official"])
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(files["safetensors"]))
    return files


@pytest.mark.parametrize("name", _params(RELEASED + DEIT))
def test_logits_match_timm(name, tmp_path):
    ref = randomize_(timm.create_model(name)).eval()
    size = cait.get_variant(name).img_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    files = _write_formats(ref.state_dict(), tmp_path)
    del ref
    for fmt, path in files.items():
        model = cait.create_model(name).eval()
        report = cait.load_pretrained(model, path)
        assert not (report.missing or report.unexpected or report.mis_shaped)
        with torch.no_grad():
            got = model(x)
        err = (got - expected).abs().max().item()
        assert err < TOL, f"{name} from {fmt}: max abs logit difference {err}"


@pytest.mark.parametrize("name,prefix", [("cait_xxs24_224", 0), ("deit_tiny_patch16_224", 1)])
def test_new_resolution_matches_timm_resampling(name, prefix):
    """A 224 model at 288: ours (on the fly, and resized at load) vs timm's resampling."""
    ref224 = randomize_(timm.create_model(name))
    state_dict = ref224.state_dict()
    resampled = dict(state_dict)
    resampled["pos_embed"] = resample_abs_pos_embed(
        state_dict["pos_embed"], [18, 18], num_prefix_tokens=prefix
    )
    ref288 = timm.create_model(name, img_size=288).eval()
    ref288.load_state_dict(resampled)
    x = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref288(x)

        on_the_fly = cait.create_model(name).eval()
        cait.load_pretrained(on_the_fly, state_dict)
        err = (on_the_fly(x) - expected).abs().max().item()
        assert err < TOL, f"on-the-fly resize: {err}"

        at_load = cait.create_model(name, img_size=288).eval()
        report = cait.load_pretrained(at_load, state_dict)
        assert report.resized_pos_embed == (14, 18)
        err = (at_load(x) - expected).abs().max().item()
        assert err < TOL, f"resize at load: {err}"
        assert torch.allclose(at_load.pos_embed, resampled["pos_embed"], atol=1e-6)


def test_parity_is_sensitive_to_a_wrong_weight():
    """The parity check can fail: a single transposed talking-heads matrix is detected."""
    ref = randomize_(timm.create_model("cait_xxs24_224")).eval()
    model = cait.create_model("cait_xxs24_224").eval()
    cait.load_pretrained(model, ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        w = model.blocks[5].attn.proj_l.weight
        w.copy_(w.t().clone())
        assert (model(x) - ref(x)).abs().max().item() > 100 * TOL
