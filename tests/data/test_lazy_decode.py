"""A transform that decodes itself (``decodes_itself``: the fast training transform) is
handed each image opened, not decoded, by every source with files (folder, list, hf,
shards): its output is the transform's on the file opened by hand, and a truncated JPEG is
the same named skip as on the reference path, in training and in evaluation."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from cait.data import AugmentConfig
from cait.data.decode import EncodedJpeg, open_image, simplejpeg
from cait.data.sources import is_streamed, keyed, open_source
from cait.data.sources.convert import write_as
from cait.data.sources.shards import read_shard
from cait.data.transforms import fast_train_transform
from cait.models.registry import get_variant

PHOTO = Path(__file__).parents[2] / "src" / "cait" / "app_examples" / "coffee.jpg"
SPEC = get_variant("cait_xxs24_224").input_spec
FORMS = ("folder", "list", "hf", "shards")
# distinct photos: the coffee picture cut and scaled differently, as the benchmark set is
SIZES = ((500, 375), (375, 500), (640, 480), (300, 300), (480, 360), (360, 480))


def _jpeg(i: int) -> bytes:
    photo = Image.open(PHOTO).convert("RGB")
    box = (7 * i, 5 * i, photo.width - 3 * i, photo.height - 11 * i)
    buffer = io.BytesIO()
    photo.crop(box).resize(SIZES[i], Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _truncated() -> bytes:
    data = _jpeg(0)
    return data[: len(data) // 2]


class Spy:
    """The fast training transform, noting whether each image it was given was not decoded
    yet, the random states it started from, and what it gave."""

    def __init__(self, decodes_itself: bool = True) -> None:
        self.inner = fast_train_transform(SPEC, AugmentConfig())
        self.decodes_itself = decodes_itself
        self.calls: list[tuple[bool, tuple, torch.Tensor]] = []

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # where simplejpeg is installed an upright JPEG comes as its bytes, else PIL's
        undecoded = (
            isinstance(img, EncodedJpeg)
            if simplejpeg is not None
            else isinstance(img, JpegImageFile) and bool(img.tile)
        )
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        out = self.inner(img)
        self.calls.append((undecoded, states, out))
        return out

    def again(self, states: tuple, img: Image.Image) -> torch.Tensor:
        """The transform on ``img`` from the random ``states`` of a call."""
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        return self.inner(img)


def _folder(root: Path, files: dict[str, list[tuple[str, bytes]]]) -> Path:
    """``root/{split}/{class}/{name}`` holding the given bytes."""
    for split, members in files.items():
        for i, (label, data) in enumerate(members):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            (root / split / label / f"{i:02d}.jpg").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    """Six JPEGs (two classes; four for training, two for validation) in every form."""
    root = tmp_path_factory.mktemp("lazy")
    jpegs = [_jpeg(i) for i in range(len(SIZES))]
    files = {
        "train": [("a", jpegs[0]), ("a", jpegs[1]), ("b", jpegs[2]), ("b", jpegs[3])],
        "val": [("a", jpegs[4]), ("b", jpegs[5])],
    }
    folder = str(_folder(root / "folder", files))
    forms = {f: write_as(open_source(folder), f, root / f) for f in FORMS if f != "folder"}
    return {"folder": folder} | forms


def _samples(split) -> list[tuple]:
    """Every sample of a split, with its key, in the split's own order."""
    split = keyed(split)
    return list(split) if is_streamed(split) else [split[i] for i in range(len(split))]


def _by_hand(form: str, split, key: str, index: int) -> Image.Image:
    """The sample's file opened by hand, not decoded."""
    if form in ("folder", "list"):
        return open_image(key)
    if form == "hf":
        return open_image(split.rows.image_bytes(index))
    path, _, name = key.partition("#")
    parts = next(parts for _, stem, parts in read_shard(Path(path)) if stem == name)
    return open_image(parts["jpg"])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["train", "val"])
def test_a_transform_that_decodes_itself_gets_the_file_undecoded(photos, form, name):
    spy = Spy()
    split = open_source(photos[form]).split(name, spy, train=name == "train")
    samples = _samples(split)
    assert len(samples) == len(spy.calls) == (4 if name == "train" else 2)
    for index, ((img, _, skipped, key), (undecoded, states, out)) in enumerate(
        zip(samples, spy.calls, strict=True)
    ):
        assert undecoded and skipped == () and img is out
        again = spy.again(states, _by_hand(form, split, key, index))
        assert img.dtype == torch.uint8 and torch.equal(img, again)


@pytest.mark.parametrize("form", FORMS)
def test_other_transforms_still_get_decoded_images(photos, form):
    spy = Spy(decodes_itself=False)
    _samples(open_source(photos[form]).split("val", spy))
    assert len(spy.calls) == 2 and not any(undecoded for undecoded, _, _ in spy.calls)


def _with_a_truncated_jpeg(form: str, root: Path) -> str:
    """A source in ``form`` whose second training and first validation images are cut off
    halfway (written by hand: ``cait shards`` and a verified folder would leave them out)."""
    good = [_jpeg(i) for i in range(3)]
    train = [("a", good[0]), ("a", _truncated()), ("b", good[1])]
    val = [("a", _truncated()), ("a", good[2]), ("b", good[1])]
    if form in ("folder", "list"):
        folder = _folder(root, {"train": train, "val": val})
        if form == "folder":
            return str(folder)
        lines = ["path,label,split"] + [
            f"{split}/{label}/{i:02d}.jpg,{label},{split}"
            for split, members in (("train", train), ("val", val))
            for i, (label, _) in enumerate(members)
        ]
        (root / "list.csv").write_text("\n".join(lines) + "\n")
        return f"list:{root / 'list.csv'}"
    root.mkdir()
    if form == "hf":
        for split, members in (("train", train), ("validation", val)):
            _parquet(root / f"{split}-0.parquet", members)
        return f"hf:{root}"
    index = {"classes": ["a", "b"], "splits": {}}
    for split, members in (("train", train), ("val", val)):
        with tarfile.open(root / f"{split}-0.tar", "w") as tar:
            for i, (label, data) in enumerate(members):
                cls = str(int(label == "b")).encode()
                for member, content in ((f"s{i}.jpg", data), (f"s{i}.cls", cls)):
                    info = tarfile.TarInfo(member)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        index["splits"][split] = [{"file": f"{split}-0.tar", "samples": len(members)}]
    (root / "index.json").write_text(json.dumps(index))
    return f"shards:{root}"


def _parquet(path: Path, members: list[tuple[str, bytes]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["a", "b"]}}
    cells = [{"bytes": data, "path": None} for _, data in members]
    table = pa.table({"image": cells, "label": [int(label == "b") for label, _ in members]})
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    pq.write_table(table.replace_schema_metadata(metadata), path)


@pytest.mark.parametrize("form", FORMS)
def test_a_truncated_jpeg_is_the_same_named_skip_as_on_the_reference_path(
    tmp_path, monkeypatch, form
):
    # a folder this small is decoded whole up front, which would leave the file out before
    # any transform saw it; large folders are read as they go, as here
    monkeypatch.setattr("cait.data.sources.folder.VERIFY_UP_TO", 0)
    data = _with_a_truncated_jpeg(form, tmp_path / form)
    for name, train in (("train", True), ("val", False)):
        runs = {}
        for lazy in (True, False):
            spy = Spy(decodes_itself=lazy)
            samples = _samples(open_source(data).split(name, spy, train=train))
            assert all(undecoded == lazy for undecoded, _, _ in spy.calls)
            runs[lazy] = [(img is None, skipped) for img, _, skipped, _ in samples]
        problems = [s for _, skipped in runs[True] for s in skipped]
        assert runs[True] == runs[False] and len(problems) == 1
        assert "truncated" in problems[0] or "Truncated" in problems[0]
        if train:  # replaced by a readable image, the problem named
            assert not any(missing for missing, _ in runs[True])
        else:  # no image, the problem named
            assert [missing for missing, _ in runs[True]] == [True, False, False]


def test_the_fast_training_transform_says_it_decodes_itself_and_the_source_does_not(
    photos, monkeypatch
):
    transform = fast_train_transform(SPEC, AugmentConfig())
    assert transform.decodes_itself is True
    train = open_source(photos["folder"]).split("train", transform, train=True)

    def no_decoding(path):
        raise AssertionError(f"the source decoded {path}")

    monkeypatch.setattr("cait.data.sources.folder.load_image", no_decoding)
    image, _, skipped = train[0]
    assert image.shape == (3, SPEC.img_size, SPEC.img_size) and skipped == ()


@pytest.mark.parametrize("error", [RuntimeError, ValueError, OSError])
@pytest.mark.parametrize("form", ["list", "shards"])
def test_only_undecodable_pixels_become_skips(photos, form, error):
    """A transform that decodes itself says a file is bad with PixelsUnreadable; anything
    else it raises (a ValueError or an OSError too, which PIL also raises) is a bug."""

    def broken(img):
        raise error("a bug in the transform")

    broken.decodes_itself = True
    with pytest.raises(error, match="a bug"):
        sample = open_source(photos[form]).split("train", broken, train=True)
        next(iter(sample)) if is_streamed(sample) else sample[0]
