"""``digits``: scikit-learn's 1797 real 8x8 handwritten digits, bundled (no download), with
a fixed split of 1437 training and 360 test images."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cait.data.sources.base import Sample, Source, SplitName, class_mapping

__all__ = ["DIGITS", "DigitsDataset", "DigitsSource", "export_digits"]

DIGITS = "digits"
# The fixed digits split: a stratified 80/20 split with scikit-learn's train_test_split and
# random_state 0, giving 1437 training and 360 test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 8x8 RGB images, with the fixed split above."""

    classes: list[str] = [str(i) for i in range(10)]

    def __init__(
        self,
        split: str,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
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
        self.split = split
        self.index = chosen.tolist()  # rows of scikit-learn's array: the samples' keys
        # pixel values are 0..16; scale to 0..255
        self.images = np.clip(digits.images[chosen] * 16, 0, 255).astype(np.uint8)
        mapping = class_mapping(self.classes, classes, "digits")
        self.targets = [mapping[t] for t in digits.target[chosen].tolist()]
        self.transform = transform
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        """Sample ``index`` as an RGB picture, untransformed."""
        return Image.fromarray(self.images[index], mode="L").convert("RGB")

    def key(self, index: int) -> str:
        return f"digits[{self.split}][{self.index[index]}]"

    def encoded(self) -> Iterator[tuple[str, bytes, int]]:
        """Every sample as ``(key, PNG bytes, label)`` (the 8x8 grayscale picture)."""
        for i in range(len(self)):
            buffer = io.BytesIO()
            Image.fromarray(self.images[i], mode="L").save(buffer, format="PNG")
            yield self.key(i), buffer.getvalue(), self.targets[i]

    def __getitem__(self, index: int) -> Sample:
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index], ()


class DigitsSource(Source):
    prefix = DIGITS

    def __init__(self, location: str = "") -> None:
        super().__init__(location)

    def __str__(self) -> str:
        return DIGITS

    def split(
        self,
        name: SplitName,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        train: bool = False,
    ) -> DigitsDataset:
        return DigitsDataset(name, transform, classes)


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
