"""Analysis tools: class-attention maps, residual-branch ratios and the ablation grids."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import randomize_
from PIL import Image
from sklearn.datasets import load_sample_images

import cait
import cait.analysis.ablation as ablation
from cait.analysis.attention import (
    GridLayout,
    SABlockOutOfRange,
    attention_maps,
    save_attention_maps,
)
from cait.analysis.residuals import save_residual_report
from cait.cli import main as cli_main
from cait.data import DigitsDataset, eval_transform
from cait.models import InputSpec
from cait.models.build import LoadedModel
from cait.models.config import CaiTConfig
from cait.models.layers import LAYERNORM_EPS
from cait.training.config import config_from_dict
from cait.training.engine import NonFiniteLossError
from cait.training.run import train

GREY = InputSpec(16, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# --------------------------------------------------------------------- attention maps

TARGETS = (6, 9)  # the patch each CA block's head 0 is built to look at (4 x 4 grid)
PEAK = 0.5  # the attention head 0 gives its target


def _known_attention_model() -> cait.CaiT:
    """A model whose class attention is known in closed form.

    The SA block and both CA blocks add nothing (LayerScale 0), the patch embedding is 0,
    so patch token j is its position embedding ``e_2j - e_2j+1`` and the class token is 0.
    After the CA block's LayerNorm, patch j is ``f (e_2j - e_2j+1)`` with
    ``f = 1 / sqrt(1/32 + eps)`` (64 channels), the class token stays 0. With ``k`` the
    identity and ``q`` a constant ``c (e_2t - e_2t+1)``, head 0 (channels 0-31, where all
    16 patches live) has logit ``scale * 2 c f`` on patch t and 0 on the 16 other tokens;
    head 1 (channels 32-63) sees only zeros: uniform attention.
    """
    config = CaiTConfig(
        img_size=16, patch_size=4, num_classes=3, embed_dim=64, depth=1, num_heads=2
    )
    model = cait.CaiT(config).eval()
    T, N, C = 1, 16, 64
    scale = (C // 2) ** -0.5
    f = 1.0 / math.sqrt(2 / C + LAYERNORM_EPS)
    # logit L on the target and 0 on the other T + N - 1 tokens gives e^L / (e^L + T + N - 1)
    logit = math.log(PEAK / (1 - PEAK) * (T + N - 1))
    c = logit / (scale * 2 * f)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for j in range(N):
            model.pos_embed[0, j, 2 * j] = 1.0
            model.pos_embed[0, j, 2 * j + 1] = -1.0
        for block, t in zip(model.blocks_token_only, TARGETS, strict=True):
            block.norm1.weight.fill_(1.0)
            block.attn.k.weight.copy_(torch.eye(C))
            block.attn.q.bias[2 * t] = c
            block.attn.q.bias[2 * t + 1] = -c
    return model


def _expected_attention() -> np.ndarray:
    """``(L=2, H=2, T=1, T + N=17)``: head 0 peaks on its target, head 1 is uniform."""
    expected = np.zeros((2, 2, 1, 17))
    for b, t in enumerate(TARGETS):
        expected[b, 0, 0, :] = (1 - PEAK) / 16
        expected[b, 0, 0, 1 + t] = PEAK
        expected[b, 1, 0, :] = 1 / 17
    return expected


def _grey_image(path: Path, size: int = 16) -> Path:
    Image.new("RGB", (size, size), (128, 128, 128)).save(path)
    return path


def test_saved_class_attention_equals_the_known_attention(tmp_path):
    loaded = LoadedModel(_known_attention_model(), GREY, None, None)
    image = _grey_image(tmp_path / "grey.png")
    records = save_attention_maps(loaded, [str(image)], tmp_path / "out")

    saved = np.load(tmp_path / "out" / "grey_class_attention.npy")
    np.testing.assert_allclose(saved, _expected_attention(), atol=1e-5)
    png = Image.open(records[0]["class_attention_png"]).convert("RGB")
    layout = GridLayout(rows=2, cols=1 + 2 + 1)  # the image, 2 heads, their mean
    assert png.size == layout.size

    pixels = np.asarray(png, dtype=np.float32)
    for row, t in enumerate(TARGETS):
        left, top, right, bottom = layout.box(row, 1)  # head 0
        cell = pixels[top:bottom, left:right].sum(-1)
        y, x = np.unravel_index(cell.argmax(), cell.shape)
        patch = layout.cell // 4
        # the brightest pixel of head 0's overlay lies in the target patch (row-major grid)
        assert (y // patch, x // patch) == divmod(t, 4)
        left, top, right, bottom = layout.box(row, 2)  # head 1: uniform -> one colour
        assert pixels[top:bottom, left:right].std(axis=(0, 1)).max() < 1.0


@pytest.mark.parametrize("sa_block", [-1, 6])
def test_an_sa_block_the_model_lacks_is_refused_naming_its_depth(sa_block):
    model = randomize_(cait.create_model("cait_digits_16")).eval()  # 6 SA blocks
    with pytest.raises(SABlockOutOfRange, match=rf"\[0, 5\], got {sa_block}") as raised:
        attention_maps(model, torch.randn(3, 16, 16), sa_block=sa_block)
    assert raised.value.depth == 6


@pytest.mark.parametrize("distilled", [False, True])
def test_every_heads_attention_sums_to_one_over_patches_and_class_tokens(distilled):
    model = randomize_(cait.create_model("cait_digits_16", distilled=distilled)).eval()
    maps = attention_maps(model, torch.randn(3, 16, 16), sa_block=2)
    T = 2 if distilled else 1
    assert maps.class_attention.shape == (2, 2, T, T + 16)
    np.testing.assert_allclose(maps.class_attention.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.self_attention.sum(-1), 1.0, atol=1e-5)
    assert maps.patch_maps().shape == (2, 2, 4, 4)
    assert maps.self_attention_maps().shape == (2, 4, 4)


def test_attention_cli_with_official_weights_at_another_resolution(tmp_path, capsys):
    """Official-format weights, a real photo, evaluated at 288 instead of 224."""
    model = cait.create_model("cait_xxs24_224")
    weights = tmp_path / "XXS24_224.pth"
    torch.save({"model": model.state_dict()}, weights)
    photo = tmp_path / "china.jpg"
    Image.fromarray(load_sample_images().images[0]).save(photo)
    args = ["attention", "--checkpoint", str(weights), "--model", "cait_xxs24_224"]
    args += [str(photo), "--output", str(tmp_path / "maps"), "--img-size", "288"]
    assert cli_main(args + ["--sa-block", "24"]) == 0  # counted from 1: the last
    assert "china_class_attention.png" in capsys.readouterr().out

    ca = np.load(tmp_path / "maps" / "china_class_attention.npy")
    assert ca.shape == (2, 4, 1, 1 + 18 * 18)  # 2 CA blocks, 4 heads, a 18 x 18 grid
    sa = np.load(tmp_path / "maps" / "china_sa24.npy")
    assert sa.shape == (4, 324, 324)
    with Image.open(tmp_path / "maps" / "china_class_attention.png") as png:
        assert png.size == GridLayout(rows=2, cols=1 + 4 + 1).size
        assert np.asarray(png.convert("L")).std() > 10  # a picture, not a blank canvas
    with Image.open(tmp_path / "maps" / "china_sa24.png") as png:
        assert png.size == GridLayout(rows=1, cols=1 + 4 + 1).size


def test_attention_bad_inputs_name_the_problem(tmp_path, capsys):
    small = cait.create_model("cait_digits_16")
    weights = tmp_path / "digits.pth"
    torch.save(small.state_dict(), weights)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = _grey_image(tmp_path / "grey.png")
    out = ["--output", str(tmp_path / "maps")]

    args = ["attention", "--checkpoint", str(weights), "--model", "cait_digits_16"]
    assert cli_main(args + [str(good), str(bad)] + out) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err
    assert not (tmp_path / "maps" / "grey_class_attention.png").exists()  # failed up front

    args = ["attention", "--checkpoint", str(weights), "--model", "cait_xxs24_224"]
    assert cli_main(args + [str(good)] + out) == 2
    err = capsys.readouterr().err
    assert "pos_embed" in err or "shape" in err

    args = ["attention", "--checkpoint", str(weights), "--model", "cait_digits_16"]
    assert cli_main(args + [str(good), "--sa-block", "7"] + out) == 2
    assert "--sa-block must be in 1..6" in capsys.readouterr().err


# --------------------------------------------------------------------- residual ratios


def test_residual_ratios_equal_a_direct_computation(tmp_path):
    """The tool (7 images in batches of 3) against per-token norms from one full batch."""
    models = {
        "layerscale": randomize_(cait.create_model("cait_digits_16", depth=3), seed=1),
        "prenorm": randomize_(
            cait.create_model("cait_digits_16", depth=2, branch_scale="none"), seed=2
        ),
    }
    loaded = [LoadedModel(m.eval(), GREY, None, None) for m in models.values()]
    results = save_residual_report(
        loaded, "digits", tmp_path, labels=list(models), num_images=7, batch_size=3
    )
    with open(tmp_path / "residuals.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r.images for r in results] == [7, 7]

    dataset = DigitsDataset("val", eval_transform(GREY))
    images = torch.stack([dataset[i][0] for i in range(7)])
    for label, model in models.items():
        with torch.no_grad():
            out = model.forward_trace(images)
        traces = out.sa + out.ca
        mine = [r for r in rows if r["label"] == label]
        assert len(mine) == len(traces) == len(model.blocks) + 2
        assert [r["stage"] for r in mine] == ["sa"] * len(model.blocks) + ["ca", "ca"]
        for row, trace in zip(mine, traces, strict=True):
            stream = trace.stream.numpy()
            attn = trace.attn_branch.numpy()
            mid = stream + attn
            mlp = trace.mlp_branch.numpy()
            want_attn = np.mean(
                [
                    np.linalg.norm(attn[i, n]) / np.linalg.norm(stream[i, n])
                    for i in range(stream.shape[0])
                    for n in range(stream.shape[1])
                ]
            )
            want_mlp = np.mean(
                [
                    np.linalg.norm(mlp[i, n]) / np.linalg.norm(mid[i, n])
                    for i in range(stream.shape[0])
                    for n in range(stream.shape[1])
                ]
            )
            assert float(row["attn_ratio"]) == pytest.approx(want_attn, rel=1e-5)
            assert float(row["mlp_ratio"]) == pytest.approx(want_mlp, rel=1e-5)
    with Image.open(tmp_path / "residuals.png") as png:
        assert png.size == (1100, 400)


def test_residuals_cli_rejects_another_models_checkpoint(tmp_path, capsys):
    weights = tmp_path / "digits.pth"
    torch.save(cait.create_model("cait_digits_16").state_dict(), weights)
    args = ["residuals", "--checkpoint", str(weights), "--model", "cait_xxs24_224"]
    assert cli_main(args + ["--data", "digits", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "embed_dim=192" in err


# --------------------------------------------------------------------- ablation grids


def test_tiny_grid_runs_tabulates_and_resumes(tmp_path, capsys, monkeypatch):
    grid = ablation.get_grid("tiny")
    out = tmp_path / "grid"
    # an interrupted grid: the first run stopped after one of its two epochs
    first = grid.configs[0]
    run_dir = out / "runs" / first.name / "seed0"
    overrides = ["optim.warmup_epochs=1"]
    settings = ablation._run_settings(
        grid,
        first,
        overrides,
        epochs=grid.epochs,
        seed=0,
        output=str(run_dir),
        stop_after=1,
        progress=False,
    )
    train(config_from_dict(settings))
    assert not (run_dir / "result.json").exists()

    args = ["ablate", "--grid", "tiny", "--output", str(out), "--no-progress"]
    assert cli_main(args + ["--set", overrides[0]]) == 0
    table = (out / "results.md").read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split("|")[1].strip() for line in body[1:]] == [c.name for c in grid.configs]
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(grid.configs) * len(grid.seeds)
    assert all(r["epochs"] == grid.epochs and 0 <= r["top1"] <= 100 for r in results)
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in resumed] == [1, 2]  # the second epoch came from the resume
    saved = yaml.safe_load((out / "runs" / "rezero_d2" / "seed1" / "config.yaml").read_text())
    assert saved["optim"]["warmup_epochs"] == 1 and saved["model_args"]["branch_scale"] == "rezero"
    with Image.open(out / "results.png") as png:
        width, height = png.size  # matplotlib rounds inches x dpi to whole pixels
        assert width == 800 and abs(height - 100 * (0.45 * len(grid.configs) + 1.2)) <= 1

    # run again: every run is finished, nothing trains
    def no_training(config):
        raise AssertionError(f"trained {config.output} again")

    monkeypatch.setattr(ablation, "train", no_training)
    assert ablation.run_ablation("tiny", None, out, progress=False, overrides=overrides) == [
        ablation.RunResult(**r) for r in results
    ]


def test_ablate_rejects_an_unknown_grid(tmp_path, capsys):
    assert cli_main(["ablate", "--grid", "huge", "--output", str(tmp_path)]) == 2
    assert "unknown grid 'huge'; grids: tiny, default, paper" in capsys.readouterr().err


def test_every_grid_configuration_is_a_valid_model_config():
    for grid in ablation.GRIDS.values():
        names = [c.name for c in grid.configs]
        assert len(set(names)) == len(names), grid.name
        for cfg in grid.configs:
            config = cait.get_variant(grid.model).config.replace(**cfg.model_args)
            assert config.depth == cfg.model_args["depth"], cfg.name


def test_a_diverged_run_is_recorded_and_tabulated(tmp_path, monkeypatch):
    """A NaN loss ends that run, not the grid; the table counts it apart from the means."""
    real_train = ablation.train

    def nan_for_rezero(config):
        if config.model_args["branch_scale"] == "rezero":
            raise NonFiniteLossError("loss is nan at epoch 1, step 3")
        return real_train(config)

    monkeypatch.setattr(ablation, "train", nan_for_rezero)
    results = ablation.run_ablation("tiny", None, tmp_path, seeds=1, epochs=1, progress=False)
    rezero = next(r for r in results if r.config == "rezero_d2")
    assert rezero.diverged and rezero.top1 is None and rezero.train_seconds is None
    # standard JSON: no NaN constants
    json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
    row = next(
        line for line in (tmp_path / "results.md").read_text().splitlines() if "rezero_d2" in line
    )
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "-" and cells[5] == "1/1"
    others = [r for r in results if r.config != "rezero_d2"]
    assert all(not r.diverged and r.top1 is not None for r in others)
