"""Datasets: the bundled digits, ImageFolder trees, reading images, exporting samples.

Two sources: the bundled ``digits`` (scikit-learn's 1797 real 8x8 handwritten digits, no
download) and an ImageFolder tree (``DIR/train/<class>/*``, ``DIR/val/<class>/*``).

Unreadable files (truncated, empty, not an image) never crash a run and are never dropped
silently: each sample carries the files it had to skip, the loop collects and reports them.

Folders are outside input, read by these rules (docs/TRAINING.md, "How data folders are
read"): entries whose name starts with ``.`` are ignored at every level; symbolic links to
folders and files are followed, a linked folder that leads back to one already walked (a
loop) is skipped; a class with no readable image, and a file that is both in ``train/`` and
in ``val/`` once links are resolved, are errors.
"""

from __future__ import annotations

import logging
import os
import random
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from cait.files import first_line

__all__ = [
    "DIGITS",
    "DigitsDataset",
    "ImageFolderDataset",
    "UNREADABLE_IMAGE_ERRORS",
    "UnreadableImage",
    "build_datasets",
    "build_val_dataset",
    "check_disjoint",
    "check_image_file",
    "class_folders",
    "collate_samples",
    "export_digits",
    "find_images",
    "load_image",
    "read_image",
]

logger = logging.getLogger(__name__)

DIGITS = "digits"
# The fixed digits split: a stratified 80/20 split with scikit-learn's train_test_split and
# random_state 0, giving 1437 training and 360 test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Folders with at most this many files are decoded once up front, so that every unreadable
# file is found and reported before training; larger ones are checked as they are read.
VERIFY_UP_TO = 20_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Errors PIL raises for files that are not (complete) images.
UNREADABLE_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)

Sample = tuple["torch.Tensor | Image.Image | None", int, tuple[str, ...]]


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, upright (grayscale, RGBA, palette and 16-bit images are
    converted; an EXIF Orientation tag is applied, as a viewer does).

    Raises ``OSError``/``ValueError`` subclasses from PIL when the file cannot be read; an
    empty file raises ``ValueError`` naming it.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    with Image.open(path) as img:
        img.load()  # decode now, so that truncated files fail here
        # phones store pictures as the sensor saw them and say how to turn them in EXIF
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode.startswith("I;16"):
            # 16-bit grayscale (PNG, TIFF): PIL's conversion clips at 255, which turns most
            # of the picture white; keep the top 8 bits instead
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        return img.convert("RGB")


URL_SCHEMES = ("http://", "https://")


class UnreadableImage(ValueError):
    """A file a user named that is not an image PIL can decode; ``reason`` is PIL's first
    line (which may name the file)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.reason = reason


def check_image_file(path: str | Path) -> os.stat_result:
    """The checks :func:`read_image` makes before it opens ``path`` (nothing is opened):
    its ``stat``, or the one-line error that ``read_image`` raises."""
    text = str(path)
    if text == "-":
        raise ValueError("reading an image from standard input is not supported")
    if text.lower().startswith(URL_SCHEMES):
        raise ValueError(f"URLs are not read: download {text} first")
    try:
        info = Path(path).stat()
    except PermissionError:  # a folder on the way may not be searched
        raise ValueError(f"permission denied: {path}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as err:  # a link loop, a name too long
        raise ValueError(f"cannot read image {path}: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise ValueError(f"{path} is not a regular file")
    return info


def read_image(path: str | Path) -> Image.Image:
    """:func:`load_image` for files a user named, with a one-line error naming the path: a
    missing file raises ``FileNotFoundError``; a URL, ``-``, a folder, a file the user may
    not read or one that is not an image (:class:`UnreadableImage`) raise ``ValueError``."""
    check_image_file(path)
    try:
        return load_image(path)
    except PermissionError:
        raise ValueError(f"permission denied: {path}") from None
    except UNREADABLE_IMAGE_ERRORS as err:
        raise UnreadableImage(path, first_line(err)) from err


def _hidden(name: str) -> bool:
    """``.DS_Store``, ``.ipynb_checkpoints``, ``._x.jpg`` (macOS), ``.git``: never data."""
    return name.startswith(".")


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder or a link to one; a link that leads nowhere or to itself
    is not (it is kept as a file, if named like an image, and reported when read)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _list_dir(folder: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not _hidden(e.name)), key=lambda e: e.name)
    except PermissionError:
        raise ValueError(f"permission denied: {folder}") from None


def class_folders(root: Path) -> list[str]:
    """The class names under ``root``: its folders (linked ones too), hidden ones left out."""
    return [e.name for e in _list_dir(root) if _is_dir(e)]


def find_images(folder: Path) -> list[Path]:
    """The image files under a class folder, sorted, hidden entries left out.

    Links are followed; a linked folder whose real path was walked already, or that holds
    ``folder`` itself (a link back up, which would loop), is skipped with a warning. A file
    link that leads nowhere is kept, so that reading it reports it.
    """
    real = os.path.realpath(folder)
    walked = {real}
    todo = [(os.fspath(folder), real)]
    files = []
    while todo:
        current, current_real = todo.pop()
        for entry in _list_dir(current):
            if _is_dir(entry):
                # a plain folder's real path is its parent's plus its name: no system call
                sub = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(current_real, entry.name)
                )
                if sub in walked or os.path.commonpath([real, sub]) == sub:
                    logger.warning(
                        "%s: skipped, it leads to %s, which this class folder already holds "
                        "or is in (a link loop)",
                        entry.path,
                        sub,
                    )
                    continue
                walked.add(sub)
                todo.append((entry.path, sub))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(entry.path)
    # strings, then paths: sorted part by part, the order of sorting the paths themselves
    return [Path(f) for f in sorted(files, key=lambda f: f.split(os.sep))]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 8x8 RGB images, with the fixed split above."""

    classes: list[str] = [str(i) for i in range(10)]

    def __init__(self, split: str, transform: Callable | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        # sklearn imports rich for its progress bars when rich is installed, and that import
        # draws from Python's global `random`. Here, after the run was seeded, it would shift
        # every later draw of the first run in a process and of no other (a resumed or second
        # run would differ), so the import leaves the state as it found it.
        state = random.getstate()
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        random.setstate(state)

        digits = load_digits()
        index = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(
            index,
            test_size=DIGITS_TEST_FRACTION,
            random_state=DIGITS_SPLIT_SEED,
            stratify=digits.target,
        )
        chosen = np.sort(train_idx if split == "train" else val_idx)
        # pixel values are 0..16; scale to 0..255
        self.images = np.clip(digits.images[chosen] * 16, 0, 255).astype(np.uint8)
        self.targets = digits.target[chosen].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index], ()


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` with unreadable files skipped and reported.

    ``substitute=True`` (training) replaces an unreadable sample by the next readable one, so
    batches keep their size; ``substitute=False`` (evaluation) returns no image for it and
    :func:`collate_samples` leaves it out, so that no image is counted twice.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        substitute: bool = False,
        verify: bool | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        found = class_folders(self.root)
        if classes is None:
            if not found:
                raise ValueError(f"no class folders in {self.root}")
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"{self.root} has class folders not in training: {extra}")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if name not in found:  # evaluation on a subset of the classes
                continue
            files = find_images(folder)
            if not files:
                raise ValueError(f"class folder {folder} has no image files")
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise ValueError(f"no images found under {self.root}")
        # Unreadable files found up front are left out here and listed in ``self.skipped``;
        # those met later (large folders are not verified up front) are reported per sample.
        self.skipped: list[str] = []
        if verify if verify is not None else len(self.samples) <= VERIFY_UP_TO:
            self._verify()
        else:
            logger.info(
                "%s: %d files, not verified up front; unreadable files will be "
                "skipped and reported when met",
                self.root,
                len(self.samples),
            )
            self._check_each_class_reads()
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.samples)

    def _no_readable_image(self, label: int, count: int, problem: str) -> ValueError:
        return ValueError(
            f"class folder {self.root / self.classes[label]} has no readable image "
            f"({count} file(s), e.g. {problem})"
        )

    def _verify(self) -> None:
        readable = []
        problems: dict[int, list[str]] = {}
        for path, label in self.samples:
            try:
                load_image(path)
                readable.append((path, label))
            except UNREADABLE_IMAGE_ERRORS as err:
                problems.setdefault(label, []).append(f"{path}: {first_line(err)}")
        kept = {label for _, label in readable}
        for label, listed in problems.items():
            if label not in kept:  # a class of unreadable files would be an empty class
                raise self._no_readable_image(label, len(listed), listed[0])
        self.samples = readable
        self.skipped = [p for listed in problems.values() for p in listed]
        if self.skipped:
            logger.warning(
                "%s: %d unreadable file(s) left out:\n  %s",
                self.root,
                len(self.skipped),
                "\n  ".join(self.skipped),
            )

    def _check_each_class_reads(self) -> None:
        """Decode files of each class until one reads (usually the first), so that a class
        of unreadable files is an error now rather than an empty class in the model."""
        pending = dict.fromkeys((t for _, t in self.samples), 0)
        first_problem: dict[int, str] = {}
        for i, (_, label) in enumerate(self.samples):
            if label not in pending:
                continue
            _, problem = self._read(i)
            if not problem:
                del pending[label]
            else:
                pending[label] += 1
                first_problem.setdefault(label, problem)
            if not pending:
                break
        for label, count in pending.items():
            raise self._no_readable_image(label, count, first_problem[label])

    def _read(self, index: int) -> tuple[Image.Image | None, str]:
        path, _ = self.samples[index]
        try:
            return load_image(path), ""
        except UNREADABLE_IMAGE_ERRORS as err:
            return None, f"{path}: {first_line(err)}"

    def __getitem__(self, index: int) -> Sample:
        skipped: list[str] = []
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            img, problem = self._read(i)
            if img is not None:
                target = self.samples[i][1]
                if self.transform is not None:
                    img = self.transform(img)
                return img, target, tuple(skipped)
            skipped.append(problem)
            if not self.substitute:
                return None, self.samples[index][1], tuple(skipped)
        raise ValueError(f"no readable image under {self.root}")


def collate_samples(batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable samples; return the skipped files' descriptions beside them."""
    skipped = [s for _, _, problems in batch for s in problems]
    kept = [(img, target) for img, target, _ in batch if img is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([img for img, _ in kept])
    targets = torch.tensor([t for _, t in kept], dtype=torch.long)
    return images, targets, skipped


def build_datasets(
    path: str, train_tf: Callable | None, eval_tf: Callable | None
) -> tuple[Dataset, Dataset, list[str]]:
    """Training and validation datasets and the class names, for ``digits`` or a folder."""
    if path == DIGITS:
        return (
            DigitsDataset("train", train_tf),
            DigitsDataset("val", eval_tf),
            list(DigitsDataset.classes),
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data path not found: {root} (expected a folder or 'digits')")
    for split in ("train", "val"):
        _require_split(root, split)
    train = ImageFolderDataset(root / "train", train_tf, substitute=True)
    val = ImageFolderDataset(root / "val", eval_tf, classes=train.classes, substitute=False)
    check_disjoint(train, val)
    return train, val, train.classes


def _require_split(root: Path, split: str) -> None:
    if not (root / split).is_dir():
        raise FileNotFoundError(
            f"{root} has no {split}/ folder (expected {root}/{split}/<class>/<image>)"
        )


def _real_paths(samples: Sequence[tuple[Path, int]]) -> list[str]:
    """Each file's real path (links resolved), resolving each folder once: a file that is
    not itself a link is its folder's real path plus its name."""
    folders: dict[str, str] = {}
    real = []
    for path, _ in samples:
        name = os.fspath(path)
        parent, base = os.path.split(name)
        if parent not in folders:
            folders[parent] = os.path.realpath(parent)
        real.append(
            os.path.realpath(name) if os.path.islink(name) else os.path.join(folders[parent], base)
        )
    return real


def check_disjoint(train: ImageFolderDataset, val: ImageFolderDataset) -> None:
    """Refuse a validation split that shares files with training once links are resolved
    (a linked class folder, a linked file, ``val`` linked to ``train``): its scores would
    be measured on training images."""
    val_files = dict(zip(_real_paths(val.samples), (p for p, _ in val.samples), strict=True))
    shared = [
        (path, val_files[real])
        for (path, _), real in zip(train.samples, _real_paths(train.samples), strict=True)
        if real in val_files
    ]
    if shared:
        path, other = shared[0]
        raise ValueError(
            f"train/ and val/ share {len(shared)} files, e.g. {path} and {other} are the same "
            "file (a symbolic link?): validation would score training images"
        )


def build_val_dataset(
    path: str, eval_tf: Callable, classes: Sequence[str] | None = None
) -> Dataset:
    """The validation split alone (for ``cait eval``): ``DIR/val``, or ``DIR`` itself when
    it holds class folders (neither ``val/`` nor ``train/``)."""
    if path == DIGITS:
        return DigitsDataset("val", eval_tf)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data path not found: {root} (expected a folder or 'digits')")
    if (root / "train").is_dir():  # a dataset root, whose train/ is not a class
        _require_split(root, "val")
    val_root = root / "val" if (root / "val").is_dir() else root
    return ImageFolderDataset(val_root, eval_tf, classes=classes, substitute=False)


def export_digits(folder: str | Path, split: str = "val", count: int = 5) -> list[Path]:
    """Write the first ``count`` digits of a split as PNG files (for trying ``predict``).

    Files are named ``<split>_<index>_label<digit>.png`` and upscaled 4x (nearest) so they
    can be looked at; ``predict`` resizes them to the model's input like any image.
    """
    ds = DigitsDataset(split)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(count, len(ds))):
        img = Image.fromarray(ds.images[i], mode="L").resize((32, 32), Image.NEAREST)
        path = folder / f"{split}_{i:03d}_label{ds.targets[i]}.png"
        img.save(path)
        paths.append(path)
    return paths
