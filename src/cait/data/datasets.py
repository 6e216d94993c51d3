"""Datasets: the bundled digits, ImageFolder trees, reading images, exporting samples.

Two sources: the bundled ``digits`` (scikit-learn's 1797 real 8x8 handwritten digits, no
download) and an ImageFolder tree (``DIR/train/<class>/*``, ``DIR/val/<class>/*``).

Unreadable files (truncated, empty, not an image) never crash a run and are never dropped
silently: each sample carries the files it had to skip, the loop collects and reports them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "DIGITS",
    "DigitsDataset",
    "ImageFolderDataset",
    "UNREADABLE_IMAGE_ERRORS",
    "build_datasets",
    "build_val_dataset",
    "collate_samples",
    "export_digits",
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
    """Open an image as RGB (grayscale, RGBA and palette images are converted).

    Raises ``OSError``/``ValueError`` subclasses from PIL when the file cannot be read; an
    empty file raises ``ValueError`` naming it.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    with Image.open(path) as img:
        img.load()  # decode now, so that truncated files fail here
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode.startswith("I;16"):
            # 16-bit grayscale (PNG, TIFF): PIL's conversion clips at 255, which turns most
            # of the picture white; keep the top 8 bits instead
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        return img.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """:func:`load_image` for files a user named: a missing file raises
    ``FileNotFoundError``, an unreadable one ``ValueError`` naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return load_image(path)
    except UNREADABLE_IMAGE_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


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
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
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
            if not folder.is_dir():
                continue
            files = sorted(
                p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
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
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.samples)

    def _verify(self) -> None:
        readable = []
        for path, label in self.samples:
            try:
                load_image(path)
                readable.append((path, label))
            except UNREADABLE_IMAGE_ERRORS as err:
                self.skipped.append(f"{path}: {err}")
        self.samples = readable
        if not self.samples:
            raise ValueError(f"no readable images under {self.root}")
        if self.skipped:
            logger.warning(
                "%s: %d unreadable file(s) left out:\n  %s",
                self.root,
                len(self.skipped),
                "\n  ".join(self.skipped),
            )

    def _read(self, index: int) -> tuple[Image.Image | None, str]:
        path, _ = self.samples[index]
        try:
            return load_image(path), ""
        except UNREADABLE_IMAGE_ERRORS as err:
            return None, f"{path}: {err}"

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
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root} has no '{split}' folder (expected {root}/{split}/<class>/)"
            )
    train = ImageFolderDataset(root / "train", train_tf, substitute=True)
    val = ImageFolderDataset(root / "val", eval_tf, classes=train.classes, substitute=False)
    return train, val, train.classes


def build_val_dataset(
    path: str, eval_tf: Callable, classes: Sequence[str] | None = None
) -> Dataset:
    """The validation split alone (for ``cait eval``)."""
    if path == DIGITS:
        return DigitsDataset("val", eval_tf)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data path not found: {root} (expected a folder or 'digits')")
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
