"""The photo folders of docs/DEPLOY.md's agreement and predict-vs-eval figures: 96x96 crops
of four colour photos scikit-image ships (``skimage.data``: astronaut, chelsea, coffee,
rocket), eight classes (the left and right half of each photo).

    python examples/photo_folders.py PHOTOS HELD_OUT

PHOTOS gets train/ (150 crops a class, seed 0) and val/ (50 a class, seed 1); HELD_OUT gets
250 crops a class (seed 2) in class folders, 2,000 images. Needs scikit-image (in the dev
extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CROP = 96
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # RGB, 300 to 640 pixels a side


def write_crops(folder: Path, count: int, seed: int) -> None:
    from skimage import data

    regions = {}
    for name in PHOTOS:
        photo = getattr(data, name)()  # (H, W, 3) uint8
        half = photo.shape[1] // 2
        regions[f"{name}_left"] = (photo, 0, half)
        regions[f"{name}_right"] = (photo, half, photo.shape[1])
    rng = np.random.default_rng(seed)
    for name, (photo, x0, x1) in regions.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            y = rng.integers(0, photo.shape[0] - CROP)
            x = rng.integers(x0, x1 - CROP)
            crop = photo[y : y + CROP, x : x + CROP]
            Image.fromarray(crop).save(folder / name / f"{i:04d}.jpg")


def main() -> None:
    photos, held_out = Path(sys.argv[1]), Path(sys.argv[2])
    write_crops(photos / "train", 150, seed=0)
    write_crops(photos / "val", 50, seed=1)
    write_crops(held_out, 250, seed=2)


if __name__ == "__main__":
    main()
