"""Datasets and samplers: the fixed digits split, unreadable files met during loading."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cait.data import (
    DigitsDataset,
    ImageFolderDataset,
    ShuffleSampler,
    collate_samples,
    load_image,
)


def test_digits_split_is_fixed_and_stratified():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.targets).min() >= 35  # every digit in the test split
    again = DigitsDataset("val")
    assert np.array_equal(val.images, again.images) and val.targets == again.targets
    img, target, skipped = train[0]
    assert img.mode == "RGB" and img.size == (8, 8) and skipped == ()
    with pytest.raises(ValueError, match="split must be"):
        DigitsDataset("test")


def _folder(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "1.png").write_text("not an image")  # replaces a/1.png
    return tmp_path


def test_lazy_skipping_substitutes_in_training_and_drops_in_eval(tmp_path):
    root = _folder(tmp_path)
    train = ImageFolderDataset(root, transform=None, substitute=True, verify=False)
    img, target, skipped = train[1]  # a/1.png is broken: b/0.png takes its place
    assert isinstance(img, Image.Image) and target == 1
    assert len(skipped) == 1 and skipped[0].startswith(str(root / "a" / "1.png"))

    val = ImageFolderDataset(root, transform=lambda im: torch.zeros(3, 8, 8), verify=False)
    batch = [val[i] for i in range(len(val))]
    images, targets, bad = collate_samples(batch)
    assert images.shape == (3, 3, 8, 8) and targets.tolist() == [0, 1, 1]
    assert len(bad) == 1


def test_verification_up_front_leaves_out_and_lists(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path), verify=True)
    assert len(ds) == 3 and len(ds.skipped) == 1 and "1.png" in ds.skipped[0]


def test_odd_modes_become_rgb(tmp_path):
    base = Image.new("RGB", (8, 8), (10, 200, 30))
    for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
        path = tmp_path / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        base.convert(mode).save(path)
        assert load_image(path).mode == "RGB", mode
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_image(empty)


def test_shuffle_sampler_depends_on_seed_and_epoch_only():
    a, b = ShuffleSampler(50, seed=1), ShuffleSampler(50, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ShuffleSampler(50, seed=2)) != first


def test_randaugment_survives_zero_bit_posterize():
    """rand-m9-mstd0.5-inc1 draws magnitude 10 at times: 0-bit posterize, which Pillow 13
    rejects; our training transform keeps timm's meaning (a black image) instead."""
    import random

    from cait.data import train_transform
    from cait.models import InputSpec
    from cait.training.config import AugmentConfig

    settings = InputSpec(16, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3)
    transform = train_transform(settings, AugmentConfig(auto_augment="rand-m10-mstd0-inc1"))
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    posterize = [op for op in ops if "Posterize" in op.name]
    assert posterize, "the policy has a posterize op"
    img = Image.new("RGB", (16, 16), (200, 100, 50))
    for op in posterize:
        op.prob = 1.0
        random.seed(0)
        out = op(img)
        assert out.getextrema() == ((0, 0), (0, 0), (0, 0))
    random.seed(0)
    for _ in range(50):
        assert transform(img).shape == (3, 16, 16)


def test_building_the_digits_leaves_pythons_random_as_it_was():
    """sklearn's first import (rich, when installed, draws from `random` at import) must
    not shift the seeded streams of a run: checked in a fresh process, where sklearn is not
    imported yet."""
    code = (
        "import random\n"
        "random.seed(0)\n"
        "before = random.getstate()\n"
        "from cait.data.datasets import DigitsDataset\n"
        "DigitsDataset('train')\n"
        "assert random.getstate() == before, 'the digits moved random'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
