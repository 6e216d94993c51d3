"""The data sources behind ``--data``: the digits written as a folder, a list file, a
Hugging Face ``datasets`` folder and tar shards read back as the same samples; every sample
once per epoch over 2 ranks x 2 loader workers; an order that depends only on
``(seed, epoch)``; ``cait shards``."""

from __future__ import annotations

import collections
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cait.cli import main
from cait.data import build_datasets, build_val_dataset, collate_keyed, make_loader
from cait.data.sources import DigitsDataset, keyed, open_source
from cait.data.sources.convert import write_as
from cait.data.sources.shards import read_shard

FORMS = ("folder", "list", "hf", "shards")


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The digits in every form: ``--data`` texts by form."""
    root = tmp_path_factory.mktemp("sources")
    digits = open_source("digits")
    return {form: write_as(digits, form, root / form) for form in FORMS} | {"digits": "digits"}


def _pixels_by_label(dataset) -> collections.Counter:
    """The multiset of (image bytes, label) over a split: the same images, in any order."""
    return collections.Counter(
        (to_tensor(img).numpy().tobytes(), label) for img, label, _ in _samples(dataset)
    )


def _samples(dataset):
    loader = make_loader(dataset, 64, collate=lambda batch: batch).loader
    return [sample for batch in loader for sample in batch]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_holds_the_same_digits(sources, form):
    train, val, classes = build_datasets(sources[form], None, None)
    assert classes == DigitsDataset.classes
    assert _pixels_by_label(val) == _pixels_by_label(DigitsDataset("val"))
    assert _pixels_by_label(train) == _pixels_by_label(DigitsDataset("train"))
    # cait eval's split is the validation split
    assert len(_samples(build_val_dataset(sources[form], None))) == 360


def _epoch_keys(data: str, epoch: int, world: int, workers: int, train: bool) -> list[list[str]]:
    """Each rank's keys in loader order for one epoch."""
    train_split, val_split, _ = build_datasets(data, to_tensor, to_tensor)
    dataset = train_split if train else val_split
    ranks = []
    for rank in range(world):
        loader = make_loader(
            keyed(dataset),
            50,
            train=train,
            workers=workers,
            seed=7,
            rank=rank,
            world=world,
            collate=collate_keyed,
        )
        loader.set_epoch(epoch)
        ranks.append([key for batch in loader.loader for key in batch[3]])
    return ranks


@pytest.mark.parametrize("form", ("digits", *FORMS))
def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(sources, form):
    ranks = _epoch_keys(sources[form], epoch=1, world=2, workers=2, train=True)
    seen = [key for rank in ranks for key in rank]
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    # 1437 samples: 718 per rank, 14 whole batches of 50 each; 37 left out (documented)
    assert [len(rank) for rank in ranks] == [700, 700]
    val = _epoch_keys(sources[form], epoch=0, world=2, workers=2, train=False)
    every = [key for rank in val for key in rank]
    assert len(every) == len(set(every)) == 360  # evaluation leaves nothing out


@pytest.mark.parametrize("form", ("shards", "list"))
def test_the_order_depends_on_seed_and_epoch_only(sources, form):
    one = _epoch_keys(sources[form], epoch=3, world=1, workers=0, train=True)
    assert one == _epoch_keys(sources[form], epoch=3, world=1, workers=2, train=True)
    assert one != _epoch_keys(sources[form], epoch=4, world=1, workers=0, train=True)


def test_cait_shards_writes_every_split_and_refuses_to_replace_without_force(
    tmp_path, sources, capsys
):
    out = tmp_path / "again"
    assert main(["shards", sources["folder"], str(out), "--shard-size", "400"]) == 0
    printed = capsys.readouterr().out
    assert (
        "train: 1437 samples in 4 shards" in printed and "val: 360 samples in 1 shards" in printed
    )
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["splits"]["train"]] == [400, 400, 400, 237]
    assert main(["shards", sources["folder"], str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    other = tmp_path / "not-shards"
    other.mkdir()
    assert main(["shards", "digits", str(other), "--force"]) == 2
    assert "not a shard folder" in capsys.readouterr().err
    assert main(["shards", "digits", str(out), "--force", "--shard-size", "2000"]) == 0
    assert len(json.loads((out / "index.json").read_text())["splits"]["train"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_cait_shards_names_the_files_it_skips(tmp_path):
    folder = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (folder / split / name).mkdir(parents=True)
            Image.new("RGB", (9, 9), (10, 20, 30)).save(folder / split / name / "ok.png")
    (folder / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    # the folder source leaves it out up front: cait shards names it too
    written = main(["shards", str(folder), str(tmp_path / "out")])
    assert written == 0
    skipped = (tmp_path / "out" / "skipped_files.txt").read_text().splitlines()
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    listed = [name for _, name, _ in read_shard(tmp_path / "out" / "train-000000.tar")]
    assert len(listed) == 2


def test_shard_members_keep_the_images_bytes(tmp_path):
    folder = tmp_path / "data"
    for split in ("train", "val"):
        (folder / split / "cat").mkdir(parents=True)
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 100, 50)).save(buffer, format="JPEG", quality=90)
        (folder / split / "cat" / "x.jpg").write_bytes(buffer.getvalue())
    assert main(["shards", str(folder), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        names = tar.getnames()
        assert names == ["train_000000000.jpg", "train_000000000.cls"]
        assert tar.extractfile(names[0]).read() == buffer.getvalue()
        assert tar.extractfile(names[1]).read() == b"0"


def test_our_shards_are_webdataset_shards(sources):
    import webdataset

    folder = sources["shards"].partition(":")[2]
    first = f"{folder}/val-000000.tar"
    samples = list(webdataset.WebDataset(first, shardshuffle=False, empty_check=False))
    assert len(samples) == 360
    assert samples[0]["__key__"] == "val_000000000" and set(samples[0]) >= {"png", "cls"}
    labels = [int(s["cls"]) for s in samples]
    assert labels == DigitsDataset("val").targets


@pytest.mark.parametrize("form", ("shards", "folder"))
def test_take_gives_the_first_samples_of_any_split_in_evaluation_order(sources, form):
    from cait.data import take

    val = build_val_dataset(sources[form], to_tensor)
    first = _samples(take(val, 5))
    assert len(first) == 5
    assert [label for _, label, _ in first] == [label for _, label, _ in _samples(val)[:5]]
