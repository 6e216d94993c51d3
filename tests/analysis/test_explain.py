"""Explanations of a prediction (rollout, gradient-weighted attention, Grad-CAM, the CA
maps) and their faithfulness (deletion and insertion areas)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, randomize_
from PIL import Image

import cait
from cait.analysis.explain import (
    METHODS,
    class_relevance,
    explain,
    explain_batch,
    head_mixed_mean,
    rollout_map,
)
from cait.analysis.faithfulness import (
    RANDOM,
    curve_area,
    faithfulness,
    format_table,
    perturbation_curves,
)
from cait.cli import main as cli_main
from cait.models.config import CaiTConfig

GRID = 4  # the tiny model's grid at its own 16 x 16 input


def _model(**kw) -> cait.CaiT:
    config = CaiTConfig(
        img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2, **kw
    )
    return randomize_(cait.CaiT(config)).eval()


# ---------------------------------------------------------------------------- the maths


def test_rollout_with_identity_self_attention_is_the_class_attention_map():
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        trace = model.forward_trace(x)
    ca_rows = [t.attn.mean(dim=1) for t in trace.ca]  # (B, T, T + N)
    eye = torch.eye(16).expand(2, 16, 16)
    rolled = rollout_map([eye, eye], ca_rows)
    ca_map = explain_batch(model, x, "ca")[0].flatten(1)
    torch.testing.assert_close(rolled, ca_map)
    # with the model's own self-attention the map differs: the test can tell
    assert not torch.allclose(explain_batch(model, x, "rollout")[0].flatten(1), ca_map)


def test_one_class_attention_block_is_half_its_attention_row():
    """The residual path keeps half of the class token: its map is half its attention."""
    rows = torch.softmax(torch.randn(1, 1, 17), dim=-1)  # one class token, 16 patches
    torch.testing.assert_close(class_relevance([rows], 16), rows[:, 0, 1:] / 2)


def test_head_mixing_is_the_attention_that_weighs_the_values():
    """``proj_w`` applied to the traced probabilities gives the values' weights: the
    attention output rebuilt from them equals the block's."""
    model = _model()
    block = model.blocks[0]
    tokens = torch.randn(1, 16, 32)
    with torch.no_grad():
        out, attn = block.attn(tokens, return_attn=True)
        v = block.attn.qkv(tokens).reshape(1, 16, 3, 2, 16)[:, :, 2].transpose(1, 2)
        mixed = torch.einsum("bhij,gh->bgij", attn, block.attn.proj_w.weight)
        mixed = mixed + block.attn.proj_w.bias[None, :, None, None]
        rebuilt = block.attn.proj((mixed @ v).transpose(1, 2).reshape(1, 16, 32))
        torch.testing.assert_close(rebuilt, out)
        torch.testing.assert_close(head_mixed_mean(attn, block.attn.proj_w), mixed.mean(dim=1))


def test_grad_cam_reads_the_gradient_of_the_blocks_output():
    """The gradient the trace gives through the MLP branch is that of the block's output,
    the next block's input."""
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    trace = model.forward_trace(x)
    score = trace.logits[0, 1]
    via_branch, via_next = torch.autograd.grad(score, [trace.sa[0].mlp_branch, trace.sa[1].stream])
    torch.testing.assert_close(via_branch, via_next)


@pytest.mark.parametrize(
    "kw", [{}, {"distilled": True}, {"branch_scale": "rezero"}, {"talking_heads": False}]
)
def test_grad_cam_is_token_wise_on_the_patches_as_the_class_stage_reads_them(kw):
    """The map is ``ReLU(sum_k sum_c Z_k * dy/dZ_k)`` with ``Z_k`` the patch rows that CA
    block ``k``'s norm1 outputs, read here with hooks as a reference."""
    model = _model(**kw)
    x = torch.randn(2, 3, 16, 16)
    read = []

    def keep(module, args, out):
        patches = out.shape[1] == GRID * GRID  # norm1 also sees the class tokens
        if patches and not any(out is z for z in read):  # rezero: both blocks read X itself
            out.retain_grad()
            read.append(out)

    handles = [b.norm1.register_forward_hook(keep) for b in model.blocks_token_only]
    logits = model(x)
    for h in handles:
        h.remove()
    assert len(read) == (1 if "branch_scale" in kw else len(model.blocks_token_only))
    targets = torch.tensor([1, 3])
    logits.gather(1, targets[:, None]).sum().backward()
    expected = sum((z * z.grad).sum(-1) for z in read).clamp(min=0)
    maps, _, _ = explain_batch(model, x, "gradcam", targets)
    torch.testing.assert_close(maps.flatten(1), expected.detach())


def test_grad_cam_of_an_earlier_block_is_token_wise_on_its_output():
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    trace = model.forward_trace(x)
    (grad,) = torch.autograd.grad(trace.logits[0, 2], trace.sa[1].stream)  # block 0's output
    expected = (trace.sa[1].stream * grad).sum(-1).clamp(min=0)
    torch.testing.assert_close(
        explain(model, x[0], "gradcam", 2, block=0).map.ravel(), expected[0].detach().numpy()
    )


def test_areas_by_the_trapezoid_rule():
    fractions = np.array([0.0, 0.5, 1.0])
    assert curve_area(fractions, np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert curve_area(fractions, np.array([0.0, 1.0, 1.0])) == pytest.approx(0.75)


# ------------------------------------------------------------------------ the methods


def test_a_gradient_methods_map_depends_on_the_class():
    model = _model()
    x = torch.randn(3, 16, 16)
    for method in ("gradient", "gradcam"):
        maps = [explain(model, x, method, target=k) for k in (0, 3)]
        assert [m.target for m in maps] == [0, 3]
        assert not np.allclose(maps[0].map, maps[1].map), method
    # the attention maps do not look at the class
    same = [explain(model, x, "rollout", target=k).map for k in (0, 3)]
    np.testing.assert_array_equal(*same)


@pytest.mark.parametrize("size", [16, 24])
@pytest.mark.parametrize("method", METHODS)
def test_every_map_has_the_token_grids_shape(method, size):
    model = _model()
    result = explain(model, torch.randn(3, size, size), method)
    grid = size // 4
    assert result.map.shape == result.grid == (grid, grid)
    assert np.isfinite(result.map).all()


@pytest.mark.parametrize("method", METHODS)
def test_an_image_smaller_than_a_patch_is_a_one_line_error(method):
    with pytest.raises(ValueError) as err:
        explain(_model(), torch.randn(3, 3, 3), method)
    one_line(err, "3x3 pixels", "smaller than one 4x4 patch")


def test_a_bad_class_or_block_is_a_one_line_error():
    model, x = _model(), torch.randn(3, 16, 16)
    with pytest.raises(ValueError) as err:
        explain(model, x, "gradient", target=5)
    one_line(err, "class must be in 0..4")
    with pytest.raises(ValueError) as err:
        explain(model, x, "gradcam", block=2)
    one_line(err, "block must be in [0, 1]")


def test_a_class_token_early_model_rolls_out_its_own_row():
    model = _model(class_token="early", ca_depth=0)
    for method in ("rollout", "gradient", "gradcam"):
        assert explain(model, torch.randn(3, 16, 16), method).map.shape == (GRID, GRID)
    with pytest.raises(ValueError, match="no class-attention blocks"):
        explain(model, torch.randn(3, 16, 16), "ca")


# ------------------------------------------------------------------------ faithfulness


def test_deleting_the_one_patch_the_model_reads_drops_the_probability():
    """A model that reads only patch 5 (its class from the sum of that patch's pixels):
    the map ranking patch 5 first deletes it at the first step and reveals it at the first
    step; the reverse ranking does so last."""

    class OnePatch(torch.nn.Module):
        def forward(self, x):
            s = x[:, :, 4:8, 4:8].sum(dim=(1, 2, 3))
            return torch.stack([s, -s], dim=1)

    images = torch.ones(1, 3, 16, 16)
    first = torch.zeros(1, GRID, GRID)
    first[0, 1, 1] = 1.0  # patch 5
    deletion, insertion, fractions = perturbation_curves(
        OnePatch(), images, first, torch.zeros(1, dtype=torch.long)
    )
    assert deletion[0, 0] > 0.99 and deletion[0, 1] == pytest.approx(0.5)
    assert insertion[0, 0] == pytest.approx(0.5) and insertion[0, 1] > 0.99
    last = 1 - first
    late, _, _ = perturbation_curves(OnePatch(), images, last, torch.zeros(1, dtype=torch.long))
    assert curve_area(fractions, deletion)[0] < curve_area(fractions, late)[0]


def test_the_table_has_every_method_and_random_and_is_seeded():
    model = _model()
    images = [torch.randn(3, 16, 16) for _ in range(3)]
    result = faithfulness(model, images, steps=4, seed=1)
    assert [s.method for s in result.scores] == [*METHODS, RANDOM]
    assert all(s.images == 3 and 0 <= s.deletion <= 1 for s in result.scores)
    again = faithfulness(model, images, steps=4, seed=1)
    assert again.score(RANDOM).deletion == result.score(RANDOM).deletion
    other = faithfulness(model, images, steps=4, seed=2)
    assert other.score(RANDOM).deletion != result.score(RANDOM).deletion
    table = format_table(result)
    assert table.splitlines()[-1].startswith(f"most faithful: {result.most_faithful()}")


# --------------------------------------------------------------------------- the CLI


def _checkpoint(folder: Path) -> Path:
    from test_inference import tiny_checkpoint

    return tiny_checkpoint(folder, "cait_digits_16", list("0123456789"), seed=3)


def _digit_png(folder: Path, name: str = "digit.png", size: int = 32) -> Path:
    path = folder / name
    Image.fromarray((np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)).save(
        path
    )
    return path


def test_cli_draws_every_method_with_a_colour_scale(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    image = _digit_png(tmp_path)
    out = tmp_path / "explain"
    args = ["explain", "--checkpoint", str(ckpt), str(image), "--output", str(out)]
    assert cli_main([*args, "--class", "7", "--block", "1"]) == 0
    assert "digit.png: class 7" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "digit_ca.npy",
        "digit_explain.png",
        *[f"digit_{m}.npy" for m in ("gradcam", "gradient", "rollout")],
    ]
    assert np.load(out / "digit_rollout.npy").shape == (GRID, GRID)
    picture = np.asarray(Image.open(out / "digit_explain.png").convert("RGB")).astype(int)
    # the colour scale: a row of the legend band running from inferno's black to its yellow
    from cait.analysis.attention import COLOURBAR_PX, GridLayout

    layout = GridLayout(1, len(METHODS) + 1)
    bar = picture[layout.legend_top + 4 + COLOURBAR_PX[1] // 2, 5 : 4 + COLOURBAR_PX[0] - 1]
    assert bar[0].sum() < 60 and bar[-1][0] > 200 and bar[-1][1] > 200  # black ... yellow
    assert (np.diff(bar.sum(axis=1)) >= -3).all()  # brighter from left to right
    # again without --force: refused in one line; with it, replaced
    assert cli_main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main([*args, "--force", "--method", "ca"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["digit_ca.npy", "digit_explain.png"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--block", "3"], "--block must be in 1..2"),
        (["--class", "10"], "class must be in 0..9"),
        (["--faithfulness"], "--faithfulness needs --data"),
        (["--data", "digits"], "--data is for --faithfulness"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path, capsys, extra, message):
    ckpt, image = _checkpoint(tmp_path), _digit_png(tmp_path)
    if "--faithfulness" in extra:
        args = ["explain", "--checkpoint", str(ckpt), *extra]
    else:
        args = ["explain", "--checkpoint", str(ckpt), str(image), "--output", str(tmp_path / "o")]
        args += extra
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


def test_cli_an_image_smaller_than_a_patch_is_one_line(tmp_path, capsys):
    """The image is resized to the model's input, unless it is smaller than one patch."""
    ckpt, image = _checkpoint(tmp_path), _digit_png(tmp_path, size=3)
    args = ["explain", "--checkpoint", str(ckpt), str(image), "--output", str(tmp_path / "o")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "smaller than" in err and "\n" not in err, err


def test_cli_prints_and_writes_the_faithfulness_table(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "faith"
    args = ["explain", "--checkpoint", str(ckpt), "--faithfulness", "--data", "digits"]
    assert cli_main([*args, "--limit", "4", "--steps", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in (*METHODS, RANDOM, "most faithful:"):
        assert name in printed
    assert sorted(p.name for p in out.iterdir()) == ["faithfulness.csv", "faithfulness.png"]
    rows = (out / "faithfulness.csv").read_text().splitlines()
    assert rows[0] == "method,deletion_auc,insertion_auc,images" and len(rows) == 6


# ------------------------------------------------- trained models: each method vs random


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's bundled photos


def write_photo_folder(root: Path, per_class: int = 30) -> Path:
    """A held-out photo folder where the class is in one place of the image: a 40-pixel
    crop of one of scikit-image's photos (``PHOTOS``) at a random place on a grey, noisy
    96-pixel background. ``train/`` crops come from the left 60% of each photo, ``val/``
    crops (``per_class // 2``) from the right 40%."""
    from skimage import data as photos

    rng = np.random.default_rng(0)
    side, crop = 96, 40
    for name in PHOTOS:
        photo = getattr(photos, name)()[..., :3]
        height, width = photo.shape[:2]
        split_x = int(width * 0.6)
        for split, (lo, hi) in (("train", (0, split_x - crop)), ("val", (split_x, width - crop))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else per_class // 2):
                x, y = rng.integers(lo, hi + 1), rng.integers(0, height - crop + 1)
                image = rng.normal(128, 20, (side, side, 3)).clip(0, 255).astype(np.uint8)
                top, left = rng.integers(0, side - crop + 1, size=2)
                image[top : top + crop, left : left + crop] = photo[y : y + crop, x : x + crop]
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def _scores_beat_random(result) -> list[str]:
    rand = result.score(RANDOM)
    return [
        s.method
        for s in result.scores
        if s.method != RANDOM and s.deletion < rand.deletion and s.insertion > rand.insertion
    ]


@pytest.mark.slow
def test_every_method_beats_random_on_a_model_trained_on_photos(tmp_path, capsys):
    """Trains cait_tiny_32 (2 SA blocks) on the photo folder for 40 epochs (no EMA), then
    scores every method on 40 of its 60 held-out val/ images. Prints the table
    (docs/analysis.md)."""
    pytest.importorskip("skimage")
    from cait.analysis.faithfulness import save_faithfulness

    data = write_photo_folder(tmp_path / "photos")
    run = tmp_path / "run"
    args = ["train", "--recipe", str(Path(__file__).parents[2] / "recipes" / "digits.yaml")]
    args += ["--data", str(data), "--output", str(run), "--set", "model=cait_tiny_32"]
    for setting in ("model_args.depth=2", "epochs=40", "ema=false", "optim.lr=3.2e-2"):
        args += ["--set", setting]  # lr: 1e-3 at this batch of 16 (the recipe's / 512 rule)
    for setting in ("progress=false", "tensorboard=false", "data.batch_size=16", "threads=2"):
        args += ["--set", setting]
    assert cli_main(args) == 0
    capsys.readouterr()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    result = save_faithfulness(run / "model.safetensors", str(data), limit=40)
    with capsys.disabled():
        print(f"\nval top-1 {last['val_top1']:.1f}%\n" + format_table(result))
    assert last["val_top1"] > 50  # it learned the photos (chance: 25%)
    assert set(METHODS) <= set(_scores_beat_random(result))


@pytest.mark.slow
def test_every_method_beats_random_on_the_demo_model():
    """Needs runs/demo/model.safetensors (``make demo``)."""
    from cait.analysis.faithfulness import save_faithfulness

    ckpt = Path(__file__).parents[2] / "runs" / "demo" / "model.safetensors"
    if not ckpt.is_file():
        pytest.skip("no demo model: run `make demo`")
    result = save_faithfulness(ckpt, "digits", limit=120)
    assert set(METHODS) <= set(_scores_beat_random(result))
