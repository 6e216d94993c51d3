"""Per-image inference (cait.inference): the checks an image file gets before the model
sees it, the same for `cait predict` and the app (tests/test_app.py), and the one path from
an image to its top classes and trace.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import one_line, randomize_
from PIL import Image
from torch import nn

import cait.data.images
import cait.inference.image
from cait.cli import main
from cait.data import eval_transform, read_image
from cait.inference import (
    patch_size,
    predict,
    predict_image,
    read_checked_image,
    top_classes,
)
from cait.models.build import load_for_inference
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import checkpoint_metadata, model_spec, save_safetensors

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

DIGITS = "cait_digits_16"  # 16x16 input, patch 4


def tiny_checkpoint(folder: Path, name: str, classes: list[str], seed: int) -> Path:
    """A ``model.safetensors`` of variant ``name`` at depth 2, random weights."""
    args = {"depth": 2}
    model = randomize_(create_model(name, **args), seed=seed)
    meta = checkpoint_metadata(model_spec(name, model, args), get_variant(name).input_spec, classes)
    path = folder / f"{name}.safetensors"
    save_safetensors(model.state_dict(), path, meta)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's
    header: PIL reads the size before decoding anything)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), DIGITS, list("0123456789"), seed=1)


def _predict_error(checkpoint: Path, image: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(image)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and not captured.out, err
    return err


def test_cait_predict_refuses_a_decompression_bomb_in_one_line(checkpoint, tmp_path, capsys):
    # over PIL's limit, where PIL only warns (and would decode 100 megapixels)
    huge = png_claiming(tmp_path / "huge.png", 10_000, 10_000)
    assert _predict_error(checkpoint, huge, capsys) == (
        f"cait predict: error: {huge} is 10000x10000 pixels, more than the 89,478,485 "
        "pixels cait decodes (it could be a decompression bomb)"
    )
    # over twice the limit: PIL refuses it as it opens the header
    bomb = png_claiming(tmp_path / "bomb.png", 30_000, 30_000)
    err = _predict_error(checkpoint, bomb, capsys)
    assert err.startswith(f"cait predict: error: cannot read image {bomb}: Image size "), err
    assert "could be decompression bomb" in err


def test_cait_predict_refuses_an_image_smaller_than_a_patch_in_one_line(
    checkpoint, tmp_path, capsys
):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (3, 8)).save(tiny)
    assert _predict_error(checkpoint, tiny, capsys) == (
        f"cait predict: error: {tiny} is 3x8 pixels, smaller than one 4x4 patch of this model"
    )
    Image.new("RGB", (4, 4)).save(tiny)  # one patch is enough
    assert main(["predict", "--checkpoint", str(checkpoint), str(tiny)]) == 0


def test_the_size_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    def decode(img, **_):
        raise AssertionError(f"{img.filename} was decoded")

    # the pixels are decoded by upright_rgb once the header passed (the file is opened once)
    monkeypatch.setattr(cait.inference.image, "upright_rgb", decode)
    huge = png_claiming(tmp_path / "huge.png", 10_000, 10_000)
    with pytest.raises(ValueError) as err:
        read_checked_image(huge)
    one_line(err, "more than the 89,478,485 pixels")
    small = tmp_path / "small.png"
    Image.new("RGB", (15, 40)).save(small)
    with pytest.raises(ValueError) as err:
        read_checked_image(small, 16)
    one_line(err, "15x40 pixels, smaller than one 16x16 patch")
    with pytest.raises(AssertionError, match="was decoded"):
        read_checked_image(small, 15)  # it passes the checks: now it would be decoded


def test_what_read_image_refuses_read_checked_image_refuses_alike(tmp_path):
    """The same one line for what is no image file at all, and no file is opened first: a
    named pipe would block the reader."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    for path in (empty, text, pipe, tmp_path, tmp_path / "missing.png", "-"):
        with pytest.raises((ValueError, FileNotFoundError)) as expected:
            read_image(path)
        with pytest.raises(type(expected.value)) as err:
            read_checked_image(path, 4)
        assert one_line(err) == str(expected.value)
    assert str(expected.value) == "reading an image from standard input is not supported"


def test_patch_size_of_our_models_and_of_timm_style_ones():
    assert patch_size(create_model(DIGITS)) == 4

    class Embed(nn.Module):
        patch_size = (16, 16)  # timm's PatchEmbed keeps a pair

    class Vit(nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.patch_embed = Embed()

    assert patch_size(Vit()) == 16
    assert patch_size(nn.Linear(2, 2)) == 1  # no patches: any image has one


def test_predict_and_predict_image_are_the_models_top_classes(checkpoint, tmp_path):
    image = tmp_path / "digit.png"
    Image.new("RGB", (16, 16), (30, 120, 200)).save(image)
    loaded = load_for_inference(str(checkpoint))
    x = eval_transform(loaded.settings)(read_image(image))
    with torch.no_grad():
        probs = loaded.model(x[None])[0].softmax(-1)
    best = int(probs.argmax())

    (result,) = predict(str(checkpoint), [str(image)], topk=3, device="cpu")
    assert result["predictions"][0] == {
        "class": best,
        "name": str(best),
        "probability": pytest.approx(float(probs[best])),
    }
    traced = predict_image(loaded, read_image(image), topk=3, trace=True)
    # the trace's logits are those of forward, up to float rounding (another kernel path)
    assert [p["class"] for p in traced.predictions] == [p["class"] for p in result["predictions"]]
    torch.testing.assert_close(traced.x, x)
    torch.testing.assert_close(traced.trace.logits[0].softmax(-1), probs)
    assert predict_image(loaded, read_image(image), topk=3).trace is None


def test_top_classes_names_and_bounds():
    logits = torch.tensor([0.0, 2.0, 1.0])
    top = top_classes(logits, ["a", "b", "c"], topk=10)  # no more than there are
    assert [p["name"] for p in top] == ["b", "c", "a"]
    assert [p["class"] for p in top_classes(logits, None, 2)] == [1, 2]
    assert top_classes(logits, None, 1)[0]["name"] == "1"
    with pytest.raises(ValueError, match="topk must be >= 1, got 0"):
        top_classes(logits, None, 0)
