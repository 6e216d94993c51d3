"""Image files and folders mean what the user meant (issue 19).

EXIF orientation, classes with no readable image, hidden and symlinked entries, train/val
overlap through links, link loops, 16-bit files in a dataset, and the one-line messages for
a path that is not an image file.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line
from PIL import Image

from cait.data import ImageFolderDataset, build_datasets, build_val_dataset, read_image
from cait.data.datasets import load_image

ORIENTATION = 0x0112  # the EXIF Orientation tag


def _image(path: Path, value: int = 0, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 100, 200 - value)).save(path)
    return path


def _tree(root: Path, classes=("cat", "dog"), splits=("train", "val"), per_class=2) -> Path:
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                _image(root / split / name / f"{i}.png", 60 * c + 10 * i)
    return root


# --- EXIF orientation -----------------------------------------------------------------


def _upright() -> np.ndarray:
    """A 24x48 (H, W) picture whose quadrants tell every rotation and flip apart."""
    img = np.zeros((24, 48, 3), np.uint8)
    img[:12, :24] = (255, 0, 0)
    img[:12, 24:] = (0, 255, 0)
    img[12:, :24] = (0, 0, 255)
    img[12:, 24:] = (255, 255, 255)
    return img


def test_exif_orientation_is_applied_everywhere_images_are_read(tmp_path):
    upright = _upright()
    # Orientation 6: the camera stored the picture turned 90 degrees counter-clockwise and
    # asks viewers to turn it 90 degrees clockwise
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (24, 48)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "data" / "train" / "cat" / "phone.jpg"
    path.parent.mkdir(parents=True)
    stored.save(path, quality=95, exif=exif)
    _image(tmp_path / "data" / "val" / "cat" / "0.png")

    train, _, _ = build_datasets(str(tmp_path / "data"), None, None)
    for img in (load_image(path), read_image(path), train[0][0]):
        assert img.size == (48, 24)  # (W, H), upright
        diff = np.abs(np.asarray(img, np.int16) - upright).mean()
        assert diff < 8, diff  # JPEG noise only; a wrong turn differs by ~100


# --- classes with no readable image ----------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_class_with_only_unreadable_files_is_an_error_naming_it(tmp_path, split, verify):
    root = _tree(tmp_path / "data")
    broken = root / split / "dog"
    for f in broken.iterdir():
        f.write_bytes(b"not an image")
    with pytest.raises(ValueError) as err:
        if verify:
            build_datasets(str(root), None, None)
        else:
            ImageFolderDataset(root / split, verify=False)
    message = one_line(err)
    assert str(broken) in message and "no readable image" in message


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_folder_with_no_image_files_is_an_error_naming_it(tmp_path, split):
    root = _tree(tmp_path / "data")
    empty = root / split / "dog"
    for f in empty.iterdir():
        f.unlink()
    (empty / "notes.txt").write_text("no pictures here")
    _image(empty / ".hidden.png")  # hidden files are not samples (below)
    with pytest.raises(ValueError) as err:
        build_datasets(str(root), None, None)
    message = one_line(err)
    assert str(empty) in message and "no image files" in message


# --- hidden entries --------------------------------------------------------------------


def test_hidden_files_and_folders_are_ignored(tmp_path):
    root = _tree(tmp_path / "data")
    for split in ("train", "val"):
        _image(root / split / ".ipynb_checkpoints" / "0-checkpoint.png")
        (root / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / split / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / split / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
        _image(root / split / "cat" / ".thumbnails" / "0.png")
    train, val, classes = build_datasets(str(root), None, None)
    assert classes == ["cat", "dog"]
    for ds in (train, val):
        assert len(ds) == 4 and ds.skipped == []
        assert not any(part.startswith(".") for p, _ in ds.samples for part in p.parts[-3:])
    alone = build_val_dataset(str(root), None, classes)
    assert len(alone) == 4


# --- symbolic links --------------------------------------------------------------------


def test_a_class_folder_linked_to_val_is_an_error(tmp_path):
    root = _tree(tmp_path / "data", classes=("dog",))
    _tree(tmp_path / "data", classes=("cat",), splits=("val",), per_class=12)
    (root / "train" / "cat").symlink_to(Path("..") / "val" / "cat")
    with pytest.raises(ValueError) as err:
        build_datasets(str(root), None, None)
    message = one_line(err)
    assert "train/ and val/ share 12 files, e.g." in message
    assert str(root / "train" / "cat") in message and str(root / "val" / "cat") in message


def test_a_linked_file_shared_with_val_is_an_error(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train" / "dog" / "extra.png").symlink_to(root / "val" / "dog" / "1.png")
    with pytest.raises(ValueError, match="share 1 files, e.g. .*extra.png"):
        build_datasets(str(root), None, None)


def test_val_linked_to_train_is_an_error(tmp_path):
    root = _tree(tmp_path / "data", splits=("train",))
    (root / "val").symlink_to("train")
    with pytest.raises(ValueError, match="share 4 files"):
        build_datasets(str(root), None, None)


def test_links_to_images_outside_the_other_split_are_followed(tmp_path):
    root = _tree(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        _image(elsewhere / "birds" / f"{i}.png", 5 * i)
        _image(elsewhere / "more_cats" / f"{i}.png", 5 * i)
    (root / "train" / "bird").symlink_to(elsewhere / "birds")  # a linked class folder
    (root / "train" / "cat" / "more").symlink_to(elsewhere / "more_cats")  # a linked subfolder
    (root / "train" / "dog" / "linked.png").symlink_to(elsewhere / "birds" / "0.png")
    train, val, classes = build_datasets(str(root), None, None)
    assert classes == ["bird", "cat", "dog"]
    counts = np.bincount(train.targets).tolist()
    assert counts == [3, 2 + 3, 2 + 1]
    assert str(root / "train" / "cat" / "more" / "0.png") in {str(p) for p, _ in train.samples}


def test_link_loops_do_not_hang_and_count_each_image_once(tmp_path):
    root = _tree(tmp_path / "data")
    cat = root / "train" / "cat"
    (cat / "loop").symlink_to("..")  # train/cat/loop -> train
    (cat / "again").symlink_to(".")  # train/cat/again -> train/cat
    (cat / "self.png").symlink_to("self.png")  # a link to itself: unreadable, reported
    result: dict = {}

    def build():
        try:
            result["datasets"] = build_datasets(str(root), None, None)
        except Exception as err:  # handed to the test below
            result["error"] = err

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "building the datasets hangs on a link loop"
    assert "error" not in result, result.get("error")
    train, _, classes = result["datasets"]
    assert classes == ["cat", "dog"]
    # loop/ and again/ lead back to folders the class folder is in: both are skipped
    assert np.bincount(train.targets).tolist() == [2, 2]
    assert len(train.skipped) == 1 and "self.png" in train.skipped[0]


# --- 16-bit images in a dataset ---------------------------------------------------------


def test_dataset_images_use_the_16_bit_reading(tmp_path):
    root = _tree(tmp_path / "data")
    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    Image.fromarray((grey << 8) | 0xFF).save(root / "train" / "cat" / "0.png")
    assert Image.open(root / "train" / "cat" / "0.png").mode == "I;16"
    train, _, _ = build_datasets(str(root), None, None)
    img = np.asarray(train[0][0])
    assert np.array_equal(img[..., 0], grey) and np.array_equal(img[..., 2], grey)


# --- messages for paths that are not what was expected ---------------------------------


@pytest.mark.parametrize("classes", [None, ["cat", "dog"]])
def test_eval_on_a_root_without_val_says_so(tmp_path, classes):
    root = _tree(tmp_path / "data", splits=("train",))
    with pytest.raises(FileNotFoundError) as err:
        build_val_dataset(str(root), None, classes)
    assert one_line(err) == f"{root} has no val/ folder (expected {root}/val/<class>/<image>)"


def test_eval_on_a_class_folder_tree_still_reads_it(tmp_path):
    root = _tree(tmp_path / "data", splits=("val",)) / "val"
    assert len(build_val_dataset(str(root), None, ["cat", "dog"])) == 4


def test_training_on_a_root_without_train_says_so(tmp_path):
    root = _tree(tmp_path / "data", splits=("val",))
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(str(root), None, None)
    assert one_line(err) == f"{root} has no train/ folder (expected {root}/train/<class>/<image>)"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "http://example.com/cat.jpg",
            "URLs are not read: download http://example.com/cat.jpg first",
        ),
        (
            "HTTPS://example.com/a.png",
            "URLs are not read: download HTTPS://example.com/a.png first",
        ),
        ("-", "reading an image from standard input is not supported"),
    ],
)
def test_urls_and_stdin_are_named_as_such(given, expected):
    with pytest.raises(ValueError) as err:
        read_image(given)
    assert one_line(err) == expected


def test_a_folder_is_not_an_image_file(tmp_path):
    with pytest.raises(ValueError) as err:
        read_image(tmp_path)
    assert one_line(err) == f"{tmp_path} is a folder, not an image file"


def test_a_missing_image_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_image(tmp_path / "nope.png")
    assert one_line(err) == f"image not found: {tmp_path / 'nope.png'}"


def _read_as_another_user(path: Path) -> str:
    """read_image(path) for a user who may not read it: ``nobody`` in a forked child when
    the tests run as root (root reads everything), the current user otherwise."""
    if os.geteuid() != 0:
        try:
            read_image(path)
        except Exception as err:
            return f"{type(err).__name__}|{err}"
        return "read"
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, read, report through the pipe, exit at once
        outcome = "read"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            read_image(path)
        except BaseException as err:
            outcome = f"{type(err).__name__}|{err}"
        finally:
            os.write(writer, outcome.encode())
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)
    return outcome


def test_permission_denied_is_not_not_found():
    # a folder of its own under /tmp (pytest's is private to root, which is the second case)
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        unreadable = _image(folder / "secret.png")
        unreadable.chmod(0o000)
        assert _read_as_another_user(unreadable) == f"ValueError|permission denied: {unreadable}"
        unreadable.chmod(0o644)
        assert _read_as_another_user(unreadable) == "read"  # the check can pass
        folder.chmod(0o700 if os.geteuid() == 0 else 0o000)  # not even its size is visible
        assert _read_as_another_user(unreadable) == f"ValueError|permission denied: {unreadable}"
    finally:
        folder.chmod(0o755)
        unreadable.unlink()
        folder.rmdir()
