"""``--crop-pct`` and an input spec's crop ratio are checked before use (issue 28): a ratio
in [0.25, 1] on the command line, CROP_PCT_RANGE in the library, never 0 read as timm's
default, a huge resize or an overflow."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import cait
from cait.cli import main as cli_main
from cait.data.transforms import eval_transform
from cait.models import InputSpec
from cait.models.checks import CROP_PCT_RANGE

SPEC = InputSpec(16, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    "value, why",
    [
        ("0", "resized to img_size / crop_pct"),
        ("1e-9", "resized to img_size / crop_pct"),
        ("0.001", "resized to img_size / crop_pct"),
        ("-1", "resized to img_size / crop_pct"),
        ("nan", "not a finite number"),
        ("inf", "not a finite number"),
        ("1.5", ""),
        ("half", ""),
    ],
)
def test_a_bad_crop_pct_is_one_usage_line_before_anything_loads(tmp_path, capsys, value, why):
    missing = tmp_path / "missing.pt"  # never looked at: the flag is refused first
    with pytest.raises(SystemExit) as stop:
        cli_main(["eval", "--checkpoint", str(missing), "--data", "digits", "--crop-pct", value])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cait eval: error: argument --crop-pct: expected a ratio in [0.25, 1]")
    assert why in last and "missing.pt" not in last


@pytest.mark.parametrize("crop", [0, 0.0, 1e-9, 0.001, math.nan, math.inf, -0.5, 2.5])
def test_eval_transform_refuses_a_crop_outside_the_range(crop):
    with pytest.raises(ValueError) as err:
        eval_transform(SPEC.replace(crop_pct=crop))
    text = str(err.value)
    low, high = CROP_PCT_RANGE
    assert text.startswith(f"crop_pct must be a number in [{low}, {high}], got ")
    assert "resized to img_size / crop_pct" in text and "\n" not in text


def test_a_crop_of_zero_is_not_timms_default():
    """timm's create_transform reads crop_pct=0 as "not given" and crops 0.875."""
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(SPEC.replace(crop_pct=0))


@pytest.mark.parametrize("crop, resized", [(0.25, 64), (0.875, 18), (1.0, 16), (0.5, 32)])
def test_a_crop_in_the_range_resizes_as_asked(crop, resized):
    transform = eval_transform(SPEC.replace(crop_pct=crop))
    sizes = [t.size for t in transform.transforms if type(t).__name__ == "Resize"]
    assert sizes == [resized]
    out = transform(Image.new("RGB", (40, 40), (10, 20, 30)))
    assert out.shape == (3, 16, 16)


def test_eval_takes_a_crop_at_the_floor(tmp_path, capsys):
    weights = tmp_path / "digits.pth"
    torch.save(cait.create_model("cait_digits_16").state_dict(), weights)
    args = ["eval", "--checkpoint", str(weights), "--model", "cait_digits_16", "--data", "digits"]
    assert cli_main([*args, "--crop-pct", "0.25", "--json", "--device", "cpu"]) == 0
    assert '"images"' in capsys.readouterr().out
