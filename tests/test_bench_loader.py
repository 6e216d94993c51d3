"""``cait bench --data``: the loader's images/s table and JSON beside timm's loader, the
per-stage CPU times, and ``--model`` still required without ``--data``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cait.bench.loader import _loaders, loader_benchmark
from cait.cli import main
from cait.data import AugmentConfig
from cait.data.sources import open_source
from cait.models.registry import get_variant

PHOTO = Path(__file__).parent.parent / "src" / "cait" / "app_examples" / "coffee.jpg"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/ with two classes of crops of a real photo (JPEGs)."""
    root = tmp_path_factory.mktemp("images")
    photo = Image.open(PHOTO).convert("RGB")
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                box = (10 * i, 5 * i, 300 + 10 * i, 220 + 5 * i)
                crop = photo.crop(box).resize((320, 240))
                crop.save(root / split / label / f"{i}.jpg", quality=90)
    rows = [f"{p.relative_to(root)},{p.parent.name},{p.parts[-3]}" for p in root.rglob("*.jpg")]
    (root / "list.csv").write_text("path,label,split\n" + "\n".join(sorted(rows)) + "\n")
    return root


def test_bench_data_prints_a_table_with_images_per_s_and_per_core(folder, capsys):
    argv = ["bench", "--data", str(folder), "--compare", "timm", "--workers", "0"]
    assert main(argv + ["--batch-size", "2", "--batches", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "img/s/worker" in out and "img/CPU-s" in out
    for row in ("synthetic", "train ", "crop+flip", "eval ", "eval-today", "train: cait / timm"):
        assert row in out, row


def test_bench_data_json(folder, capsys):
    argv = ["bench", "--data", str(folder), "--pipelines", "train,eval", "--compare", "timm"]
    argv += ["--workers", "0", "--batch-size", "2", "--batches", "1", "--rounds", "1", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    got = {(t["pipeline"], t["impl"]) for t in r["timings"]}
    assert got == {("train", "cait"), ("train", "timm"), ("eval", "cait"), ("eval", "timm")}
    for t in r["timings"]:
        assert t["images_per_s"] > 0 and t["per_worker"] > 0
        assert len(t["rounds"]) == 1
    assert set(r["ratios"]) == {"train", "eval"}


def test_bench_data_reads_any_source(folder, capsys):
    """A list file of the same images times as the folder does; timm reads folders only."""
    argv = ["bench", "--data", f"list:{folder / 'list.csv'}", "--workers", "0"]
    argv += ["--pipelines", "train,eval", "--batch-size", "2", "--batches", "1", "--rounds", "1"]
    assert main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {(t["pipeline"], t["impl"]) for t in r["timings"]} == {
        ("train", "cait"),
        ("eval", "cait"),
    }
    assert main(argv + ["--compare", "timm"]) == 2
    assert "--compare timm reads a folder" in capsys.readouterr().err
    assert main(argv + ["--stages", "2"]) == 2
    assert "--stages reads the files of a folder" in capsys.readouterr().err


def test_loader_benchmark_with_a_worker_counts_its_cpu(folder):
    r = loader_benchmark(
        str(folder), pipelines=["crop+flip"], workers=1, batch_size=2, batches=2, rounds=1
    )
    (t,) = r.timings
    assert t.workers == 1 and t.images_per_s > 0
    assert t.per_cpu_s is None or t.per_cpu_s > 0


def test_bench_data_stages(folder, capsys):
    argv = ["bench", "--data", str(folder), "--stages", "4", "--rounds", "1", "--batch-size", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for step in ("decode", "crop+resize", "flip", "to-tensor", "collate", "img/s/core"):
        assert step in out, step


def test_bench_without_model_or_data_is_a_one_line_error(capsys):
    assert main(["bench"]) == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_bench_data_unknown_pipeline(folder, capsys):
    assert main(["bench", "--data", str(folder), "--pipelines", "train,decode"]) == 2
    err = capsys.readouterr().err
    assert "unknown pipeline 'decode'" in err and len(err.strip().splitlines()) == 1


def test_bench_data_times_other_sources_of_the_same_images_beside_it(folder, tmp_path, capsys):
    assert main(["shards", str(folder), str(tmp_path / "shards")]) == 0
    argv = ["bench", "--data", str(folder), "--beside", f"shards:{tmp_path / 'shards'}"]
    argv += ["--beside", f"list:{folder / 'list.csv'}", "--pipelines", "synthetic,eval-today"]
    argv += ["--workers", "0", "--batch-size", "2", "--batches", "1", "--rounds", "1", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    got = {(t["pipeline"], t["impl"]) for t in r["timings"]}
    assert got == {
        ("synthetic", "synthetic"),
        ("eval-today", "cait"),
        ("eval-today", "shards"),
        ("eval-today", "list"),
    }
    assert set(r["source_cpu_ratios"]) == {"shards eval-today", "list eval-today"}


@pytest.mark.parametrize(
    "form, decoder",
    [
        ("folder", "cait.data.sources.folder.load_image"),
        ("list", "cait.data.sources.manifest.load_image"),
        ("shards", "cait.data.sources.base.decode_image_bytes"),
    ],
)
def test_bench_data_trains_through_the_sources_own_split_undecoded(
    folder, tmp_path, monkeypatch, form, decoder
):
    """The train and crop+flip rows time what training reads: the source's own split, which
    hands the fast transform its files undecoded (the source's decoder is never called)."""
    text = {"folder": str(folder), "list": f"list:{folder / 'list.csv'}"}.get(form)
    if form == "shards":
        assert main(["shards", str(folder), str(tmp_path / "shards")]) == 0
        text = f"shards:{tmp_path / 'shards'}"
    spec = get_variant("cait_xxs24_224").input_spec
    made = _loaders(text, spec, AugmentConfig(), ["train", "crop+flip"], None, 0, 2)
    split_type = type(open_source(text).split("train"))

    def no_decoding(data):
        raise AssertionError("the source decoded an image")

    monkeypatch.setattr(decoder, no_decoding)
    for loader, step in made.values():
        assert type(loader.dataset) is split_type and loader.dataset.transform.decodes_itself
        images = step(next(iter(loader))[0])
        assert images.shape == (2, 3, spec.img_size, spec.img_size)
