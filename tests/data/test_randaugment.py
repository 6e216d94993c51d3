"""RandAugment's faster shear, translate and sharpness kernels (cait.data.randaugment,
compiled by numba in cait.data.pixel_kernels): PIL's pixels exactly, and the recipe's ops,
probabilities and magnitudes unchanged in the fast training transform."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from timm.data import auto_augment

from cait.data import AugmentConfig, pixel_kernels, transforms
from cait.data.randaugment import (
    FAST_OPS,
    FastOp,
    rotate,
    sharpness,
    shear_x,
    shear_y,
    translate_x_abs,
    translate_x_rel,
    translate_y_abs,
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
    # timm's absolute translations take pixels: here 100 x the level
    "translate_x_abs": (
        lambda img, a, fill: translate_x_abs(img, a * 100, fill),
        lambda a, w, h: (1, 0, a * 100, 0, 1, 0),
    ),
    "translate_y_abs": (
        lambda img, a, fill: translate_y_abs(img, a * 100, fill),
        lambda a, w, h: (1, 0, 0, 0, 1, a * 100),
    ),
}

needs_numba = pytest.mark.skipif(not pixel_kernels.AVAILABLE, reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("level", [0.3, -0.3, 0.137, -0.021, 0.45, 0.0, 1.7, -3.0, 1e-13])
@pytest.mark.parametrize("size", [(224, 224), (200, 150), (7, 300), (1, 1), (3, 2)])
def test_kernels_give_pils_pixels(name, level, size):
    """Each kernel is PIL's bicubic AFFINE transform (timm's op), pixel for pixel: the
    fill, the taps clipped at the ends, shears past the image and shifts a hair off whole
    pixels included."""
    kernel, matrix = CASES[name]
    img = photo(size)
    want = np.asarray(pil_affine(img, matrix(level, *size)))
    got = np.asarray(kernel(img, level, FILL))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if abs(level) >= 0.3 and min(size) > 100:  # the op did something
        assert not np.array_equal(got, np.asarray(img))


@needs_numba
@pytest.mark.parametrize(
    "degrees", [17.0, -29.3, 0.5, 1e-9, 30.0, -3.7, 45.0, 135.2, 200.0, -91.0, 359.99, 90.0]
)
@pytest.mark.parametrize("size", [(224, 224), (200, 150), (7, 30), (1, 1), (3, 2)])
def test_rotate_gives_pils_pixels(degrees, size):
    """timm's Rotate (PIL's rotate about the centre, bicubic, the fill outside), pixel
    for pixel: the matrix PIL builds, taps clipped at the edges, turns past 90 degrees."""
    img = photo(size)
    want = np.asarray(img.rotate(degrees, BICUBIC, fillcolor=FILL))
    np.testing.assert_array_equal(np.asarray(rotate(img, degrees, FILL)), want)


@needs_numba
@pytest.mark.parametrize("factor", [0.0, 1.0, 0.1, 0.5, 0.999, 1.9, 1.3, 1.0000001, -0.5, 3.0])
@pytest.mark.parametrize("size", [(224, 224), (200, 150), (3, 3), (2, 9), (1, 1)])
def test_sharpness_gives_pils_pixels(factor, size):
    """PIL's SMOOTH filter and blend: interpolation, extrapolation (clipped), the shortcuts
    at 0 and 1, the copied border, and images too small to filter."""
    img = photo(size)
    want = np.asarray(ImageEnhance.Sharpness(img).enhance(factor))
    np.testing.assert_array_equal(np.asarray(sharpness(img, factor)), want)


@needs_numba
def test_kernels_hold_on_many_crops():
    """Two hundred random crops of the shipped photo at random levels: every value equal."""
    rng = random.Random(0)
    full = Image.open(PHOTO).convert("RGB")
    for _ in range(200):
        w, h = rng.randint(16, 120), rng.randint(16, 120)
        left, top = rng.randint(0, full.width - w), rng.randint(0, full.height - h)
        img = full.crop((left, top, left + w, top + h))
        name = rng.choice(list(CASES))
        kernel, matrix = CASES[name]
        level = rng.uniform(-0.6, 0.6)
        want = np.asarray(pil_affine(img, matrix(level, w, h)))
        np.testing.assert_array_equal(np.asarray(kernel(img, level, FILL)), want, err_msg=name)
        degrees = rng.uniform(-30, 30)
        want = np.asarray(img.rotate(degrees, BICUBIC, fillcolor=FILL))
        np.testing.assert_array_equal(np.asarray(rotate(img, degrees, FILL)), want)
        factor = rng.uniform(0.1, 1.9)
        want = np.asarray(ImageEnhance.Sharpness(img).enhance(factor))
        np.testing.assert_array_equal(np.asarray(sharpness(img, factor)), want)


def test_the_kernels_python_source_gives_pils_pixels():
    """What numba compiles, run as plain Python: PIL's pixels too (the arithmetic is the
    source's, not an artefact of the compiler)."""
    img = photo((9, 7))
    src = np.asarray(img)
    fill = np.array(FILL, np.uint8)
    for a1, a2 in ((0.3, 0.0), (0.0, -2.6), (-0.7, 1.2)):
        want = np.asarray(pil_affine(img, (1, a1, a2, 0, 1, 0)))
        got = pixel_kernels._shift_rows(src, 1.0, a1, a2, fill, np.empty_like(src))
        np.testing.assert_array_equal(got, want)
    matrix = (0.94, 0.34, -1.9, -0.34, 0.94, 3.3)  # a turn of about 20 degrees
    got = pixel_kernels._affine(src, *matrix, fill, np.empty_like(src))
    np.testing.assert_array_equal(got, np.asarray(pil_affine(img, matrix)))
    for factor in (0.4, 1.6):
        want = np.asarray(ImageEnhance.Sharpness(img).enhance(factor))
        got = pixel_kernels._smooth_blend(src, np.float32(factor), np.empty_like(src))
        np.testing.assert_array_equal(got, want)


def test_fast_op_falls_back_to_timms_function_for_other_filters_and_modes():
    """Bilinear, a random filter choice, or a grey image: timm's own function runs."""
    img = photo((64, 48))
    op = FastOp(shear_x, auto_augment.shear_x)
    one_value = op(img, 0.2, fillcolor=124, resample=BICUBIC)  # not an RGB colour: timm's
    want = auto_augment.shear_x(img, 0.2, fillcolor=124, resample=BICUBIC)
    assert one_value.tobytes() == want.tobytes()
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
    # a random choice of filters: timm's function draws it (the same draws), whichever it
    # picks; seeds that pick bilinear would differ from our bicubic kernel's picture
    either = (Image.Resampling.BILINEAR, BICUBIC)
    bicubic = shear_x(img, 0.2, FILL).tobytes()
    picked = set()
    for seed in range(8):
        random.seed(seed)
        got = op(img, 0.2, fillcolor=FILL, resample=either)
        after = random.getstate()
        random.seed(seed)
        want = auto_augment.shear_x(img, 0.2, fillcolor=FILL, resample=either)
        assert got.tobytes() == want.tobytes() and after == random.getstate()
        picked.add(got.tobytes() == bicubic)
    assert picked == {True, False}  # both filters were drawn


def randaugment(transform):
    return next(t for t in transform.transforms if type(t).__name__ == "RandAugment")


@needs_numba
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
    # the recipe's policy (rand-m9-mstd0.5-inc1) has six of them
    assert sorted(swapped) == [
        "Rotate",
        "SharpnessIncreasing",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
    ]
    assert set(swapped) <= set(FAST_OPS)
    plain = randaugment(fast_train_transform(SPEC, AugmentConfig(), fast_ops=False))
    assert not any(isinstance(op.aug_fn, FastOp) for op in plain.ops)
    assert not any(isinstance(op.aug_fn, FastOp) for op in reference.ops)


@needs_numba
def test_fast_randaugment_draws_what_timms_draws():
    """Seed for seed, the fast RandAugment applies the op the reference applies, with the
    same magnitude (the same calls to the random generators): the same picture, and the
    fast kernels did run."""
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
        want = np.asarray(reference(img))
        for rng in (random.seed, np.random.seed, torch.manual_seed):
            rng(seed)
        np.testing.assert_array_equal(np.asarray(fast(img)), want, err_msg=str(seed))
    assert len(ran) >= 5  # about 60 x 2 x 0.5 x 6 / 15 = 24 expected


def test_without_numba_the_ops_keep_timms_kernels(monkeypatch, caplog):
    """An install without numba trains as before (timm's kernels) and says why, once."""
    monkeypatch.setattr(pixel_kernels, "AVAILABLE", False)
    transforms._say_no_numba.cache_clear()
    with caplog.at_level("INFO", logger="cait.data.transforms"):
        for _ in range(2):
            fast = randaugment(fast_train_transform(SPEC, AugmentConfig()))
            assert not any(isinstance(op.aug_fn, FastOp) for op in fast.ops)
    said = [r.getMessage() for r in caplog.records if "numba is not installed" in r.getMessage()]
    assert len(said) == 1
    transforms._say_no_numba.cache_clear()


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
