"""Bad input to every source, each a named skip (reported with the samples, counted in
``skipped_files.txt`` by a run) or a one-line error; never a silently dropped shard."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from conftest import one_line
from PIL import Image

from cait.data import build_datasets, build_val_dataset, make_loader
from cait.data.sources import open_source


def _png(colour: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _shard_folder(root, train: list[list[tuple[str, bytes]]], counts=None) -> str:
    """A shard folder: the given training shards and one good validation shard."""
    root.mkdir()
    entries = []
    for i, members in enumerate(train):
        _shard(root / f"train-{i}.tar", members)
        samples = counts[i] if counts else len({m.split(".")[0] for m, _ in members})
        entries.append({"file": f"train-{i}.tar", "samples": samples})
    _shard(root / "val-0.tar", [("v0.png", _png()), ("v0.cls", b"1")])
    index = {
        "classes": ["a", "b"],
        "splits": {"train": entries, "val": [{"file": "val-0.tar", "samples": 1}]},
    }
    (root / "index.json").write_text(json.dumps(index))
    return f"shards:{root}"


def _good(i: int) -> list[tuple[str, bytes]]:
    return [(f"s{i}.png", _png(i)), (f"s{i}.cls", str(i % 2).encode())]


def _epoch(data: str, train: bool = True) -> tuple[int, list[str]]:
    """Images and skipped descriptions of one epoch (batches of 2)."""
    train_split, val_split, _ = build_datasets(data, _tensor, _tensor)
    loader = make_loader(train_split if train else val_split, 2, train=train).loader
    images, skipped = 0, []
    for x, _, bad in loader:
        images += len(x)
        skipped += bad
    return images, skipped


def _tensor(img: Image.Image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img).copy())


def test_a_corrupt_member_and_a_label_out_of_range_are_named_skips(tmp_path):
    members = _good(0) + [("bad.png", b"\x89PNG\r\n broken"), ("bad.cls", b"0")]
    members += [("far.png", _png()), ("far.cls", b"7")] + _good(3)
    data = _shard_folder(tmp_path / "s", [members])
    images, skipped = _epoch(data)
    assert images == 4  # batches keep their size: the bad samples are replaced
    assert len(skipped) == 2
    assert any("#bad" in s for s in skipped) and any(
        "label 7 is outside [0, 2)" in s for s in skipped
    )


def test_a_truncated_shard_names_the_samples_it_lost(tmp_path):
    data = _shard_folder(tmp_path / "s", [_good(0) + _good(1) + _good(2) + _good(3)])
    path = tmp_path / "s" / "train-0.tar"
    # a sample is 4 blocks of 512 bytes (two headers, two padded members): cut inside the
    # third, so the last two are lost
    path.write_bytes(path.read_bytes()[:5000])
    images, skipped = _epoch(data)
    assert images == 4 and len(skipped) == 2
    assert all("missing" in s and "train-0.tar" in s for s in skipped)


def test_a_shard_holding_fewer_samples_than_its_index_says_is_reported(tmp_path):
    data = _shard_folder(tmp_path / "s", [_good(0) + _good(1)], counts=[4])
    _, skipped = _epoch(data)
    assert skipped and "fewer samples than its index says" in skipped[0]


def test_a_missing_shard_is_a_one_line_error_before_anything_is_read(tmp_path):
    data = _shard_folder(tmp_path / "s", [_good(0) + _good(1)])
    (tmp_path / "s" / "train-0.tar").unlink()
    with pytest.raises(FileNotFoundError) as err:
        open_source(data)
    one_line(err, "train-0.tar: listed in", "but missing")


@pytest.mark.parametrize(
    "index, says",
    [
        ("not json", "not JSON"),
        ('{"classes": [], "splits": {}}', "classes must be"),
        (
            '{"classes": ["a"], "splits": {"train": [{"file": "../x.tar", "samples": 1}]}}',
            "not a plain file name",
        ),
        ('{"classes": ["a"], "splits": {"test": []}}', "unknown splits"),
        (
            '{"classes": ["a"], "splits": {"train": [{"file": "t.tar", "samples": -1}]}}',
            "sample count",
        ),
    ],
)
def test_a_bad_index_is_a_one_line_error(tmp_path, index, says):
    (tmp_path / "index.json").write_text(index)
    with pytest.raises(ValueError) as err:
        open_source(f"shards:{tmp_path}")
    one_line(err, says)


def test_parquet_with_the_wrong_columns_is_a_one_line_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"picture": [_png()], "y": [0]}), tmp_path / "train-0.parquet")
    with pytest.raises(ValueError) as err:
        open_source(f"hf:{tmp_path}")
    one_line(err, "its columns are ['picture', 'y']", "expected an image column")


def _parquet(path, labels: list[int], images: list[bytes]) -> None:
    """A parquet file as the Hub writes it: the features (an Image, a ClassLabel with the
    names a, b) in its schema's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["a", "b"]}}
    cells = [{"bytes": data, "path": None} for data in images]
    table = pa.table({"image": cells, "label": labels})
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_parquet_labels_out_of_range_are_a_one_line_error(tmp_path):
    _parquet(tmp_path / "train-0.parquet", [0, 1], [_png(), _png()])
    _parquet(tmp_path / "validation-0.parquet", [0, 5], [_png(), _png()])
    source = open_source(f"hf:{tmp_path}")
    assert source.split("train").classes == ["a", "b"]
    with pytest.raises(ValueError) as err:
        source.split("val", _tensor)
    one_line(err, "row 1 has label 5, outside [0, 2)")


def test_a_parquet_image_that_does_not_decode_is_a_named_skip(tmp_path):
    _parquet(tmp_path / "train-0.parquet", [0, 1, 1], [_png(), b"junk", _png()])
    _parquet(tmp_path / "validation-0.parquet", [0], [_png()])
    train = open_source(f"hf:{tmp_path}").split("train", _tensor, train=True)
    image, label, skipped = train[1]  # replaced by the next readable image
    assert image is not None and label == 1 and len(skipped) == 1
    assert skipped[0].startswith(f"hf:{tmp_path}[train][1]: ")
    evaluated = open_source(f"hf:{tmp_path}").split("train", _tensor)
    assert evaluated[1][0] is None and evaluated[1][2] == tuple(skipped)


def test_a_list_with_missing_paths_skips_them_by_name(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "list.csv").write_text("path,label\na.png,cat\nnowhere.png,cat\n")
    val = build_val_dataset(f"list:{tmp_path / 'list.csv'}", _tensor)
    assert len(val) == 1 and "nowhere.png: listed at line 3, no such file" in val.skipped[0]


def test_a_list_with_labels_training_does_not_have_is_a_one_line_error(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "list.csv").write_text("path,label,split\na.png,cat,train\na.png,dog,val\n")
    with pytest.raises(ValueError) as err:
        build_datasets(f"list:{tmp_path / 'list.csv'}", _tensor, _tensor)
    one_line(err, "classes not in training: ['dog']")


@pytest.mark.parametrize(
    "text, says",
    [
        ("path,label\n", "no rows"),
        ("file,label\nx.png,a\n", "expected path,label"),
        ("path,label,split\nx.png,a,test\n", "split must be train or val"),
        ("path,label\n,a\n", "must be non-empty"),
    ],
)
def test_a_malformed_list_is_a_one_line_error(tmp_path, text, says):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(ValueError) as err:
        open_source(f"list:{tmp_path / 'list.csv'}")
    one_line(err, says)


def test_training_needs_a_list_with_splits(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "list.jsonl").write_text('{"path": "a.png", "label": "cat"}\n')
    with pytest.raises(ValueError) as err:
        build_datasets(f"list:{tmp_path / 'list.jsonl'}", _tensor, _tensor)
    one_line(err, "one split (for cait eval)")
    assert len(build_val_dataset(f"list:{tmp_path / 'list.jsonl'}", _tensor)) == 1


def test_an_unknown_prefix_is_a_folder_and_a_missing_one_says_what_data_may_name(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        open_source("webdataset:/nowhere")
    one_line(err, "shards:DIR, hf:DIR, list:FILE")
    with pytest.raises(ValueError) as err:
        open_source("shards:")
    one_line(err, "name a location after shards:")


def test_shards_made_elsewhere_without_an_index_are_counted(tmp_path):
    import webdataset

    for split, count in (("train", 5), ("val", 2)):
        with webdataset.TarWriter(str(tmp_path / f"{split}-0000.tar")) as sink:
            for i in range(count):
                sink.write({"__key__": f"{split}{i}", "png": _png(i), "cls": str(i % 3).encode()})
    train, val, classes = build_datasets(f"shards:{tmp_path}", _tensor, _tensor)
    assert classes == ["0", "1", "2"] and (train.total, val.total) == (5, 2)
    assert _epoch(f"shards:{tmp_path}", train=False)[0] == 2
