"""The fast decode path (cait.data.decode): the same crops as timm's and torchvision's
RandomResizedCrop, DCT-domain decoding of large JPEGs, uint8 output that collates, and the
batched normalise and erasing equal to the reference's."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as tv

from cait.data import UNREADABLE_IMAGE_ERRORS, AugmentConfig, collate_samples, load_image
from cait.data.decode import (
    DeviceAugment,
    EncodedJpeg,
    ResizedCrop,
    crop_params,
    erase_batch,
    finish_image,
    normalize_batch,
    open_image,
)
from cait.data.transforms import (
    device_augment,
    eval_transform,
    fast_eval_transform,
    fast_train_transform,
    train_transform,
)
from cait.models.registry import get_variant

PHOTO = Path(__file__).parents[2] / "src" / "cait" / "app_examples" / "coffee.jpg"
SPEC = get_variant("cait_xxs24_224").input_spec
# No RandAugment or erasing: decode, crop, flip and colour jitter (which the recipe leaves
# out with RandAugment), the same RNG calls in both transforms.
PLAIN = AugmentConfig(auto_augment=None, re_prob=0.0)


def photo_jpeg(path: Path, size: tuple[int, int], exif: Image.Exif | None = None) -> Path:
    """The shipped coffee photo scaled to ``size`` and saved as a quality-90 JPEG."""
    image = Image.open(PHOTO).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    image.save(path, quality=90, exif=exif or Image.Exif())
    return path


@pytest.mark.parametrize(
    "size", [(500, 375), (375, 500), (224, 224), (64, 1000), (1000, 64), (3, 2)]
)
@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.2, 5))])
def test_crop_params_are_timms_box_for_box(size, scale, ratio):
    """Same seed, same boxes, fallback (elongated images) included: the crop distribution
    (scale, ratio, position) is the reference's."""
    img = Image.new("RGB", size)
    for seed in range(200):
        random.seed(seed)
        ours = crop_params(*size, scale, ratio)
        random.seed(seed)
        theirs = RandomResizedCropAndInterpolation.get_params(img, scale, ratio)
        assert ours == tuple(theirs), (seed, ours, theirs)


def test_fast_transform_gives_the_references_crops(tmp_path):
    """With the same seed the fast transform's image is the reference's (same box and flip;
    torch's uint8 bicubic differs from PIL's by rounding): a wrong box would differ a lot."""
    path = photo_jpeg(tmp_path / "a.jpg", (500, 375))
    reference = train_transform(SPEC, PLAIN)
    fast = fast_train_transform(SPEC, PLAIN)
    for seed in range(8):
        torch.manual_seed(seed)
        random.seed(seed)
        want = reference(load_image(path))
        torch.manual_seed(seed)
        random.seed(seed)
        got = normalize_batch(fast(open_image(path))[None], SPEC.mean, SPEC.std)[0]
        step = 0.25 / (255 * min(SPEC.std))  # a quarter of a grey level, normalised
        assert (got - want).abs().mean() < step, seed


def test_large_jpeg_decodes_at_a_dct_scale_close_to_the_full_decode(tmp_path):
    """A crop shrunk 2x or more decodes the JPEG at 1/2, 1/4 or 1/8 scale; the box is
    scaled with it, so the picture is the full decode's within a few grey levels."""
    path = photo_jpeg(tmp_path / "big.jpg", (2000, 1500))
    crop = ResizedCrop(224, scale=(0.9, 1.0))
    exact = ResizedCrop(224, scale=(0.9, 1.0), draft=False)
    random.seed(0)
    img, box = crop.plan(open_image(path))
    assert finish_image(img).size[0] <= 1000  # decoded at half the size or less
    random.seed(0)
    drafted = np.asarray(crop(open_image(path)), dtype=float)
    random.seed(0)
    full = np.asarray(exact(open_image(path)), dtype=float)
    assert np.abs(drafted - full).mean() < 3.0


def test_exif_rotated_jpeg_is_cropped_upright(tmp_path):
    """A JPEG with an EXIF orientation is decoded whole and turned before its crop is
    drawn, as load_image does: the same seed gives the same picture either way."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    path = photo_jpeg(tmp_path / "turned.jpg", (500, 375), exif)
    assert load_image(path).size == (375, 500)
    crop = ResizedCrop(224)
    random.seed(3)
    lazy = np.asarray(crop(open_image(path)))
    random.seed(3)
    decoded = np.asarray(crop(load_image(path)))
    np.testing.assert_array_equal(lazy, decoded)


def test_fast_transform_returns_uint8_chw_that_collates(tmp_path):
    paths = [photo_jpeg(tmp_path / f"{i}.jpg", (400 + 50 * i, 300)) for i in range(3)]
    gray = tmp_path / "gray.png"
    Image.open(PHOTO).convert("L").save(gray)
    transform = fast_train_transform(SPEC, AugmentConfig())
    samples = [(transform(open_image(p)), i, ()) for i, p in enumerate([*paths, gray])]
    for image, _, _ in samples:
        assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
    images, targets, skipped = collate_samples(samples)
    assert images.shape == (4, 3, 224, 224) and targets.tolist() == [0, 1, 2, 3]
    out = device_augment(SPEC, AugmentConfig())(images)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 224, 224)


def test_open_image_takes_bytes_and_refuses_empty_files(tmp_path):
    path = photo_jpeg(tmp_path / "a.jpg", (500, 375))
    transform = fast_train_transform(SPEC, PLAIN)
    random.seed(0)
    torch.manual_seed(0)
    from_path = transform(open_image(path))
    random.seed(0)
    torch.manual_seed(0)
    from_bytes = transform(open_image(path.read_bytes()))
    assert torch.equal(from_path, from_bytes)
    (tmp_path / "empty.jpg").touch()
    for empty in (tmp_path / "empty.jpg", b""):
        with pytest.raises(ValueError, match="empty file"):
            open_image(empty)


@pytest.mark.parametrize("engine", ["torch", "pil"])
def test_crop_to_tensor_is_the_images_pixels(tmp_path, engine):
    """The tensor the crop hands to a tensor flip is the image it would hand to PIL."""
    path = photo_jpeg(tmp_path / "a.jpg", (500, 375))
    random.seed(2)
    image = ResizedCrop(224, engine=engine)(open_image(path))
    random.seed(2)
    tensor = ResizedCrop(224, engine=engine, to_tensor=True)(open_image(path))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 224, 224)
    assert torch.equal(tensor, tv.functional.pil_to_tensor(image))
    crop_flip = fast_train_transform(SPEC, AugmentConfig(), randaugment=False)
    assert [type(t).__name__ for t in crop_flip.transforms[1:]] == [
        "RandomHorizontalFlip",
        "MaybePILToTensor",
    ]
    assert crop_flip.transforms[0].to_tensor
    assert not fast_train_transform(SPEC, PLAIN).transforms[0].to_tensor  # jitter: PIL


def test_pil_engine_and_reducing_gap_keep_the_shape(tmp_path):
    path = photo_jpeg(tmp_path / "a.jpg", (500, 375))
    for engine, gap in (("pil", None), ("pil", 3.0), ("torch", None)):
        out = ResizedCrop(224, engine=engine, reducing_gap=gap)(open_image(path))
        assert out.size == (224, 224) and out.mode == "RGB"
    with pytest.raises(ValueError, match="engine must be torch or pil"):
        ResizedCrop(224, engine="cv2")


def test_normalize_batch_equals_to_tensor_then_normalize():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    reference = tv.Compose([tv.ToTensor(), tv.Normalize(SPEC.mean, SPEC.std)])
    want = torch.stack([reference(Image.fromarray(x.permute(1, 2, 0).numpy())) for x in images])
    got = normalize_batch(images, SPEC.mean, SPEC.std)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected a uint8"):
        normalize_batch(images.float(), SPEC.mean, SPEC.std)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("count", [1, 3])
def test_erase_batch_equals_timms_random_erasing(mode, count):
    """Same seeds, same boxes and fill: timm's RandomErasing (as its PrefetchLoader runs
    it on batches) and ours agree exactly."""
    batch = torch.randn(8, 3, 32, 32)
    random.seed(1)
    torch.manual_seed(1)
    want = RandomErasing(0.5, mode=mode, max_count=count, device="cpu")(batch.clone())
    random.seed(1)
    torch.manual_seed(1)
    got = erase_batch(batch.clone(), 0.5, mode, count)
    assert not torch.equal(want, batch)  # something was erased
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_device_augment_normalises_then_erases():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    plain = DeviceAugment(SPEC.mean, SPEC.std)(images)
    torch.testing.assert_close(plain, normalize_batch(images, SPEC.mean, SPEC.std))
    random.seed(0)
    erased = DeviceAugment(SPEC.mean, SPEC.std, re_prob=1.0)(images)
    assert (erased != plain).any(dim=(1, 2, 3)).all()  # every image got a box
    with pytest.raises(ValueError, match="erasing mode"):
        erase_batch(plain, 0.5, "noise")


def test_fast_eval_transform_is_the_eval_transform_in_uint8(tmp_path):
    """The same resize and crop; normalised on the device it is today's eval input."""
    images = [load_image(photo_jpeg(tmp_path / f"{i}.jpg", (500 - 90 * i, 375))) for i in range(3)]
    fast = fast_eval_transform(SPEC)
    batch = torch.stack([fast(img) for img in images])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 224, 224)
    want = torch.stack([eval_transform(SPEC)(img) for img in images])
    torch.testing.assert_close(normalize_batch(batch, SPEC.mean, SPEC.std), want, atol=1e-5, rtol=0)


def jpeg_variants(tmp_path: Path) -> list[Path]:
    """JPEGs of each kind the fast decoder takes: 4:2:0 and 4:4:4 colour, progressive, grey."""
    image = Image.open(PHOTO).convert("RGB").resize((300, 220), Image.Resampling.BICUBIC)
    paths = []
    for name, img, options in (
        ("420", image, {}),
        ("444", image, {"subsampling": 0}),
        ("progressive", image, {"progressive": True}),
        ("grey", image.convert("L"), {}),
    ):
        paths.append(tmp_path / f"{name}.jpg")
        img.save(paths[-1], quality=90, **options)
    return paths


def test_simplejpeg_decodes_pils_pixels(tmp_path):
    """simplejpeg's libjpeg-turbo gives PIL's pixels exactly, so the fast path with it
    crops the same picture as without it."""
    pytest.importorskip("simplejpeg")
    fast, plain = ResizedCrop(224, decoder="simplejpeg"), ResizedCrop(224, decoder="pil")
    for path in jpeg_variants(tmp_path):
        img, box = fast.plan(open_image(path))
        pixels = fast.decode(img, box)
        assert isinstance(pixels, torch.Tensor), path.name  # simplejpeg decoded it
        want = np.asarray(finish_image(open_image(path)))
        np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), want, err_msg=path.name)
        random.seed(5)
        got = fast(open_image(path))
        random.seed(5)
        assert np.array_equal(np.asarray(got), np.asarray(plain(open_image(path)))), path.name


def test_jpegs_libjpeg_warns_about_read_as_the_reference_reads_them(tmp_path):
    """A JPEG with stray bytes (libjpeg warns; PIL decodes it) goes through PIL; a
    truncated one raises one of the errors a skipped file is counted by."""
    pytest.importorskip("simplejpeg")
    from cait.data import UNREADABLE_IMAGE_ERRORS

    data = photo_jpeg(tmp_path / "a.jpg", (300, 220)).read_bytes()
    stray = tmp_path / "stray.jpg"
    stray.write_bytes(data[:-2] + b"\0" * 16 + data[-2:])  # 16 bytes before the end marker
    crop = ResizedCrop(224, decoder="simplejpeg")
    random.seed(1)
    got = crop(open_image(stray))
    random.seed(1)
    assert np.array_equal(np.asarray(got), np.asarray(ResizedCrop(224)(load_image(stray))))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UNREADABLE_IMAGE_ERRORS):
        fast_train_transform(SPEC, AugmentConfig(), decoder="simplejpeg")(open_image(truncated))


def test_decoder_auto_falls_back_to_pil_and_says_so(monkeypatch, caplog):
    from cait.data import decode

    monkeypatch.setattr(decode, "simplejpeg", None)
    decode._say_no_simplejpeg.cache_clear()
    with caplog.at_level("INFO", logger="cait.data.decode"):
        assert ResizedCrop(224).decoder == "pil"
        assert ResizedCrop(224).decoder == "pil"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "simplejpeg is not installed" in caplog.records[0].message
    decode._say_no_simplejpeg.cache_clear()
    with pytest.raises(ValueError, match="needs the simplejpeg package"):
        ResizedCrop(224, decoder="simplejpeg")
    with pytest.raises(ValueError, match="decoder must be one of auto, simplejpeg, pil"):
        ResizedCrop(224, decoder="cv2")


def test_planar_tensor_is_pil_to_tensor_contiguous(tmp_path):
    """The training transform's last step gives timm's pixels, laid out band by band (so
    that collating copies them whole), and passes a tensor through."""
    from timm.data.transforms import MaybePILToTensor

    from cait.data.decode import ToPlanarTensor

    image = Image.open(PHOTO).convert("RGB").resize((61, 47))
    got = ToPlanarTensor()(image)
    assert got.is_contiguous() and got.dtype == torch.uint8
    assert torch.equal(got, MaybePILToTensor()(image))
    assert ToPlanarTensor()(got) is got
    steps = fast_train_transform(SPEC, AugmentConfig()).transforms
    assert isinstance(steps[-1], ToPlanarTensor)
    path = photo_jpeg(tmp_path / "a.jpg", (500, 375))
    out = fast_train_transform(SPEC, AugmentConfig())(open_image(path))
    assert out.is_contiguous() and out.shape == (3, 224, 224)


def _with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """JPEG ``data`` with one more segment right after its start marker."""
    return (
        data[:2]
        + bytes([0xFF, marker])
        + (len(payload) + 2).to_bytes(2, "big")
        + payload
        + data[2:]
    )


def test_open_image_hands_plain_jpegs_over_as_bytes_and_the_rest_to_pil(tmp_path, monkeypatch):
    """An upright RGB or grey JPEG comes as its bytes (no PIL header parse); one that EXIF
    or XMP may turn, a CMYK one, another format, a header that cannot be walked, or a file
    too big to read whole goes to PIL, and each crops the reference's picture."""
    pytest.importorskip("simplejpeg")
    from cait.data import decode

    for path in jpeg_variants(tmp_path):
        img = open_image(path)
        assert isinstance(img, EncodedJpeg), path.name
        assert img.size == Image.open(path).size and img.data == path.read_bytes()
    plain = photo_jpeg(tmp_path / "plain.jpg", (300, 220)).read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: the picture is 220 x 300
    xmp = b'http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'
    others = {
        "exif.jpg": photo_jpeg(tmp_path / "exif.jpg", (300, 220), exif=exif).read_bytes(),
        "xmp.jpg": _with_segment(plain, 0xE1, xmp + b"</x:xmpmeta>"),
        "cmyk.jpg": None,
        "image.png": None,
    }
    image = Image.open(PHOTO).convert("RGB").resize((300, 220))
    image.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    image.save(tmp_path / "image.png")
    for name, data in others.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        img = open_image(path)
        assert isinstance(img, Image.Image), name
        assert open_image(path.read_bytes()).size == img.size, name
        for seed in range(3):
            random.seed(seed)
            got = ResizedCrop(224)(open_image(path))
            random.seed(seed)
            want = ResizedCrop(224)(load_image(path))
            assert np.array_equal(np.asarray(got), np.asarray(want)), (name, seed)
    assert load_image(tmp_path / "xmp.jpg").size == (220, 300)  # XMP turned it
    with pytest.raises(UNREADABLE_IMAGE_ERRORS):
        open_image(b"\xff\xd8\xff\x00 not a segment")
    # fill bytes or a marker without a length before an EXIF segment: PIL walks them and
    # finds the turn, so they go to PIL (a walk that read a length there would miss it)
    exif_segment = others["exif.jpg"]
    for extra in (b"\xff", b"\xff\xd0"):
        path = tmp_path / "odd.jpg"
        path.write_bytes(exif_segment[:2] + extra + exif_segment[2:])
        assert isinstance(open_image(path), Image.Image), extra
        assert load_image(path).size == (220, 300), extra  # PIL found the turn
        random.seed(0)
        got = ResizedCrop(224)(open_image(path))
        random.seed(0)
        assert np.array_equal(np.asarray(got), np.asarray(ResizedCrop(224)(load_image(path))))
    # not an image: PIL's own error, naming the file, as the reference path says it
    text = tmp_path / "text.jpg"
    text.write_bytes(b"\xff\xd8\xff plain text")
    with pytest.raises(UNREADABLE_IMAGE_ERRORS) as theirs:
        load_image(text)
    with pytest.raises(UNREADABLE_IMAGE_ERRORS) as ours:
        open_image(text)
    assert str(ours.value) == str(theirs.value) and str(text) in str(ours.value)
    if hasattr(os, "mkfifo"):  # a FIFO (size 0) is refused, not read: reading would block
        os.mkfifo(tmp_path / "pipe.jpg")
        with pytest.raises(ValueError, match="empty file"):
            open_image(tmp_path / "pipe.jpg")
    # past PIL's pixel limit: PIL's warning, or its refusal past twice the limit (the
    # 4:2:0 variant, 300 x 220, is otherwise an EncodedJpeg)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 220 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        assert isinstance(open_image(tmp_path / "420.jpg"), Image.Image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 220 // 2 - 1)
    with pytest.raises(Image.DecompressionBombError):
        open_image(tmp_path / "420.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 220)
    assert isinstance(open_image(tmp_path / "420.jpg"), EncodedJpeg)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100)
    big = open_image(tmp_path / "plain.jpg")
    assert isinstance(big, Image.Image) and big.filename == str(tmp_path / "plain.jpg")
