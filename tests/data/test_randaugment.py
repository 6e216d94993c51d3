"""RandAugment's faster shear and translate kernels (cait.data.randaugment): PIL's
pixels but for rare one-level rounding flips, and the recipe's ops, probabilities and
magnitudes unchanged in the fast training transform."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from cait.data import AugmentConfig
from cait.data.randaugment import (
    FAST_OPS,
    FastOp,
    shear_x,
    shear_y,
    translate_x_rel,
    translate_y_rel,
)
from cait.data.transforms import fast_train_transform, train_transform
from cait.models.registry import get_variant

PHOTO = Path(__file__).parents[2] / "src" / "cait" / "app_examples" / "coffee.jpg"
SPEC = get_variant("cait_xxs24_224").input_spec
FILL = (124, 116, 104)  # timm's img_mean fill for ImageNet's mean
BICUBIC = Image.Resampling.BICUBIC


def photo(size: tuple[int, int] = (224, 224)) -> Image.Image:
    return Image.open(PHOTO).convert("RGB").resize(size, BICUBIC)


def pil_affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=FILL)


# (our kernel, the PIL affine matrix timm builds for it from the level and the size)
CASES = {
    "shear_x": (shear_x, lambda a, w, h: (1, a, 0, 0, 1, 0)),
    "shear_y": (shear_y, lambda a, w, h: (1, 0, 0, a, 1, 0)),
    "translate_x": (translate_x_rel, lambda a, w, h: (1, 0, a * w, 0, 1, 0)),
    "translate_y": (translate_y_rel, lambda a, w, h: (1, 0, 0, 0, 1, a * h)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("level", [0.3, -0.3, 0.137, -0.021, 0.45, 0.0])
@pytest.mark.parametrize("size", [(224, 224), (200, 150)])
def test_kernels_give_pils_pixels(name, level, size):
    """Each kernel is PIL's bicubic AFFINE transform (timm's op) to one grey level, on
    all but a handful of pixels (float32 against PIL's double), fill included."""
    kernel, matrix = CASES[name]
    img = photo(size)
    want = np.asarray(pil_affine(img, matrix(level, *size)), dtype=int)
    got = np.asarray(kernel(img, level, FILL), dtype=int)
    assert got.shape == want.shape
    differ = np.abs(got - want)
    assert differ.max() <= 1
    assert (differ > 0).mean() < 5e-3  # 0 to 0.26 % of the values on this photo
    if abs(level) >= 0.3:  # a wrong shift (or a missing fill) would differ by far more
        assert not np.array_equal(got, np.asarray(img))


def test_fast_op_falls_back_to_timms_function_for_other_filters_and_modes():
    """Bilinear, a random filter choice, or a grey image: timm's own function runs."""
    img = photo((64, 48))
    op = FastOp(shear_x, auto_augment.shear_x)
    bilinear = op(img, 0.2, fillcolor=FILL, resample=Image.Resampling.BILINEAR)
    want = img.transform(
        img.size,
        Image.Transform.AFFINE,
        (1, 0.2, 0, 0, 1, 0),
        resample=Image.Resampling.BILINEAR,
        fillcolor=FILL,
    )
    assert bilinear.tobytes() == want.tobytes()
    grey = img.convert("L")
    got = op(grey, 0.2, fillcolor=124, resample=BICUBIC)
    want = auto_augment.shear_x(grey, 0.2, fillcolor=124, resample=BICUBIC)
    assert got.mode == "L" and got.tobytes() == want.tobytes()
    random.seed(0)
    got = op(img, 0.2, fillcolor=FILL, resample=(Image.Resampling.BILINEAR, BICUBIC))
    random.seed(0)
    want = auto_augment.shear_x(
        img, 0.2, fillcolor=FILL, resample=(Image.Resampling.BILINEAR, BICUBIC)
    )
    assert got.tobytes() == want.tobytes()


def randaugment(transform):
    return next(t for t in transform.transforms if type(t).__name__ == "RandAugment")


def test_fast_transform_keeps_the_recipes_ops_probabilities_and_magnitudes():
    reference = randaugment(train_transform(SPEC, AugmentConfig()))
    fast = randaugment(fast_train_transform(SPEC, AugmentConfig()))
    assert (fast.num_layers, fast.choice_weights) == (
        reference.num_layers,
        reference.choice_weights,
    )
    assert len(fast.ops) == len(reference.ops) == 15
    swapped = []
    for ours, theirs in zip(fast.ops, reference.ops, strict=True):
        fields = ("name", "prob", "magnitude", "magnitude_std", "magnitude_max", "level_fn")
        assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields]
        assert ours.kwargs == theirs.kwargs and ours.hparams == theirs.hparams
        if isinstance(ours.aug_fn, FastOp):
            swapped.append(ours.name)
            assert ours.aug_fn.fallback is theirs.aug_fn
        else:
            assert ours.aug_fn is theirs.aug_fn
    assert sorted(swapped) == sorted(FAST_OPS)
    plain = randaugment(fast_train_transform(SPEC, AugmentConfig(), fast_ops=False))
    assert not any(isinstance(op.aug_fn, FastOp) for op in plain.ops)
    assert not any(isinstance(op.aug_fn, FastOp) for op in reference.ops)


def test_fast_randaugment_draws_what_timms_draws():
    """Seed for seed, the fast RandAugment applies the op the reference applies, with the
    same magnitude (the same calls to the random generators): the pictures agree but for
    a few pixels, and the fast kernels did run."""
    reference = randaugment(train_transform(SPEC, AugmentConfig()))
    fast = randaugment(fast_train_transform(SPEC, AugmentConfig()))
    ran = []
    for op in fast.ops:
        if isinstance(op.aug_fn, FastOp):
            kernel = op.aug_fn.kernel
            op.aug_fn.kernel = lambda *args, kernel=kernel: ran.append(1) or kernel(*args)
    img = photo()
    for seed in range(60):
        for rng in (random.seed, np.random.seed, torch.manual_seed):
            rng(seed)
        want = np.asarray(reference(img), dtype=int)
        for rng in (random.seed, np.random.seed, torch.manual_seed):
            rng(seed)
        got = np.asarray(fast(img), dtype=int)
        # a one-level flip may grow in the op after (contrast, posterize), on a few pixels;
        # another op or magnitude would change most of them
        differ = np.abs(got - want)
        assert (differ > 0).mean() < 0.01 and differ.mean() < 0.1, seed
    assert len(ran) >= 5  # about 60 x 2 x 0.5 x 4 / 15 = 16 expected


def test_op_and_decoder_tables_time_each_op_and_decoder(tmp_path):
    """The tables docs/DATA.md quotes: a row per op (timm's and ours) and per decoder."""
    from cait.bench.stages import decoder_table, randaugment_op_table

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            photo((64, 48)).save(tmp_path / split / label / "0.jpg", quality=90)
    ops = randaugment_op_table(str(tmp_path), images=2, rounds=2).splitlines()
    assert len(ops) == 2 + 15 + 2 and ops[2].split()[0] == "AutoContrast"
    assert all(float(x) >= 0 for line in ops[2:17] for x in line.split()[1:])
    decoders = decoder_table(str(tmp_path), images=2, rounds=1).splitlines()
    assert decoders[2].split()[0] == "pil" and decoders[2].split()[2:] == ["0", "0.000"]
