"""Datasets, transforms and samplers for training and evaluation.

Two sources: the bundled ``digits`` (scikit-learn's 1797 real 8x8 handwritten digits, no
download) and an ImageFolder tree (``DIR/train/<class>/*``, ``DIR/val/<class>/*``).
Augmentation comes from timm's data utilities, as in the DeiT/CaiT recipe.

Unreadable files (truncated, empty, not an image) never crash a run and are never dropped
silently: each sample carries the files it had to skip, the loop collects and reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import Mixup, create_transform
from torch.utils.data import Dataset, Sampler

from cait.train_config import AugmentConfig

__all__ = [
    "DIGITS",
    "DataSettings",
    "DigitsDataset",
    "ImageFolderDataset",
    "RepeatedAugSampler",
    "ShardSampler",
    "ShuffleSampler",
    "UNREADABLE_IMAGE_ERRORS",
    "build_datasets",
    "build_mixup",
    "build_train_sampler",
    "build_val_dataset",
    "collate_samples",
    "eval_transform",
    "export_digits",
    "load_image",
    "read_image",
    "train_transform",
]

logger = logging.getLogger(__name__)

DIGITS = "digits"
# The fixed digits split: a stratified 80/20 split with scikit-learn's train_test_split and
# random_state 0, giving 1437 training and 360 test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Folders with at most this many files are decoded once up front, so that every unreadable
# file is found and reported before training (about a minute for 20k small files).
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


@dataclass(frozen=True)
class DataSettings:
    """Resolved input settings (config values, else the model variant's)."""

    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 8x8 RGB images, with the fixed split above."""

    classes: list[str] = [str(i) for i in range(10)]

    def __init__(self, split: str, transform: Callable | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

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


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Posterize that accepts 0 bits (a black image), as Pillow did before version 13."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform: Callable) -> None:
    """timm's RandAugment ``inc1`` policy asks for 0-bit posterize at magnitude 10, which
    Pillow >= 13 rejects with ``ValueError``; swap the op in this transform only."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


def train_transform(settings: DataSettings, augment: AugmentConfig) -> Callable:
    """The recipe's training transform: RandomResizedCrop, flip, RandAugment, erasing."""
    transform = create_transform(
        settings.img_size,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        re_prob=augment.re_prob,
        re_mode=augment.re_mode,
        re_count=augment.re_count,
    )
    _allow_zero_bit_posterize(transform)
    return transform


def eval_transform(settings: DataSettings) -> Callable:
    """Resize to ``img_size / crop_pct`` and center-crop (crop 1.0 for CaiT, 0.875 DeiT)."""
    return create_transform(
        settings.img_size,
        is_training=False,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        crop_pct=settings.crop_pct,
    )


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


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # one stream per (seed, epoch); the multiplier is any odd constant larger than the
    # number of epochs, so that no two (seed, epoch) pairs share a stream
    return torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch)


_EPOCH_STRIDE = 100_003


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")


class ShuffleSampler(Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``, so a resumed run sees the
    same order as an uninterrupted one.

    With ``num_replicas`` processes, rank ``r`` takes ``order[r::num_replicas]``, cut to
    ``size // num_replicas`` so that every rank has as many samples and none is shared (the
    last ``size % num_replicas`` of each epoch's order are left out; which ones changes every
    epoch). Batch ``s`` of every rank together are then the images of batch ``s`` of one
    process with the global batch.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        _check_rank(num_replicas, rank)
        self.size = size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=_epoch_generator(self.seed, self.epoch))
        return iter(order[self.rank :: self.num_replicas][: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


class RepeatedAugSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``).

    Each epoch the shuffled indices are repeated ``repeats`` times in a row
    (``[i, i, i, j, j, j, ...]``) and dealt to the ranks in turn, so the copies of an image
    get different augmentations on different ranks (or, on one process, sit in the same
    batch). Each rank keeps ``size // num_replicas`` samples, the epoch length of plain
    shuffling (:class:`ShuffleSampler`), so an epoch has the same number of steps and covers
    about ``1 / repeats`` of the distinct images. The order depends only on
    ``(seed, epoch)``.
    """

    def __init__(
        self, size: int, repeats: int, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        _check_rank(num_replicas, rank)
        self.size = size
        self.repeats = repeats
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=_epoch_generator(self.seed, self.epoch))
        repeated = order.repeat_interleave(self.repeats).tolist()
        mine = repeated[self.rank :: self.num_replicas]
        return iter(mine[: self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Evaluation order: rank ``r`` of ``num_replicas`` takes indices ``r, r + n, ...``.

    No padding (unlike ``DistributedSampler``): the shards differ in length by at most one
    and together hold every index exactly once, so summed counts are exact.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        _check_rank(num_replicas, rank)
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


def build_train_sampler(
    dataset: Dataset, repeats: int, seed: int, num_replicas: int = 1, rank: int = 0
) -> Sampler[int]:
    """Plain shuffling, or repeated augmentation when ``repeats > 1``; sharded by rank."""
    if repeats > 1:
        return RepeatedAugSampler(len(dataset), repeats, seed, num_replicas, rank)
    return ShuffleSampler(len(dataset), seed, num_replicas, rank)


def build_mixup(augment: AugmentConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing folded into the soft targets (or None)."""
    if not augment.mixes:
        return None
    return Mixup(
        mixup_alpha=augment.mixup,
        cutmix_alpha=augment.cutmix,
        prob=augment.mixup_prob,
        switch_prob=augment.mixup_switch_prob,
        mode=augment.mixup_mode,
        label_smoothing=augment.label_smoothing,
        num_classes=num_classes,
    )


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
