"""The photo folders of docs/DEPLOY.md's agreement and predict-vs-eval figures: 96x96 crops
of scikit-learn's two bundled photos (``load_sample_images``: china, flower), four classes
(the left and right half of each photo).

    python examples/photo_folders.py PHOTOS HELD_OUT

PHOTOS gets train/ (150 crops a class, seed 0) and val/ (100 a class, seed 1); HELD_OUT gets
500 crops a class (seed 2) in class folders, 2,000 images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

CROP = 96


def write_crops(folder: Path, count: int, seed: int) -> None:
    china, flower = load_sample_images().images  # (427, 640, 3) each
    regions = {
        "china_left": (china, 0, 320),
        "china_right": (china, 320, 640),
        "flower_left": (flower, 0, 320),
        "flower_right": (flower, 320, 640),
    }
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
    write_crops(photos / "val", 100, seed=1)
    write_crops(held_out, 500, seed=2)


if __name__ == "__main__":
    main()
