"""A benchmark set of ImageNet-like JPEGs for the loader benchmarks (docs/DATA_THROUGHPUT.md).

Real photographs, not noise: the colour photos scikit-image ships (``skimage.data``), one
class per photo, each image a random crop of its photo (a random share of its area and a
landscape or portrait aspect, as in ImageNet) scaled to about 500 x 375 and saved as a
quality-90 JPEG (ImageNet's files are mostly 500 x 375 or 375 x 500, quality ~90). Written
as an ImageFolder tree, ``OUT/train/<class>/*.jpg`` and ``OUT/val/<class>/*.jpg``;
the same seed gives the same files.

    pip install scikit-image   # the photos; nothing else of it is used
    .venv/bin/python examples/make_bench_images.py /tmp/bench_images --count 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs in scikit-image's wheel (no download). camera is grey; ImageNet has
# a few grey pictures stored as RGB, so it is kept, as RGB.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)
# ImageNet's most common sizes: 500 x 375 (landscape, about three quarters) and 375 x 500.
LONG_SIDE = 500
SHORT_SIDE = 375
PORTRAIT_SHARE = 0.25
SIZE_JITTER = 0.1  # sides vary by up to 10 %, as real collections do
AREA_SHARE = (0.35, 1.0)  # the share of the photo's area each crop keeps
JPEG_QUALITY = 90


def load_photos() -> dict[str, Image.Image]:
    """The source photos as RGB PIL images, by name."""
    try:
        from skimage import data
    except ImportError:
        sys.exit("make_bench_images.py needs scikit-image for its photos: pip install scikit-image")
    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}


def one_image(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` with the aspect of its output size, scaled to that size."""
    long_side = round(LONG_SIDE * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
    short_side = round(long_side * SHORT_SIDE / LONG_SIDE)
    out_w, out_h = (
        (short_side, long_side) if rng.random() < PORTRAIT_SHARE else (long_side, short_side)
    )
    w, h = photo.size
    share = rng.uniform(*AREA_SHARE)
    crop_w = min(w, np.sqrt(share * w * h * out_w / out_h))
    crop_h = min(h, crop_w * out_h / out_w)
    crop_w = crop_h * out_w / out_h
    left = rng.uniform(0, max(w - crop_w, 0.0))
    top = rng.uniform(0, max(h - crop_h, 0.0))
    box = (left, top, left + crop_w, top + crop_h)
    image = photo.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def write_split(
    photos: dict[str, Image.Image], folder: Path, count: int, rng: np.random.Generator
) -> None:
    names = list(photos)
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = names[i % len(names)]
        image = one_image(photos[name], rng)
        image.save(folder / name / f"{i:06d}.jpg", quality=JPEG_QUALITY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write (train/ and val/ in it)")
    parser.add_argument("--count", type=int, default=2000, help="training images")
    parser.add_argument("--val-count", type=int, help="validation images (default: count / 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.count < len(PHOTOS):
        parser.error(f"--count must be at least {len(PHOTOS)} (one image per class)")
    val_count = args.val_count if args.val_count is not None else max(args.count // 10, 8)
    if val_count < len(PHOTOS):
        parser.error(f"--val-count must be at least {len(PHOTOS)} (one image per class)")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    photos = load_photos()
    rng = np.random.default_rng(args.seed)
    write_split(photos, args.out / "train", args.count, rng)
    write_split(photos, args.out / "val", val_count, rng)
    print(f"wrote {args.count} training and {val_count} validation images to {args.out}")


if __name__ == "__main__":
    main()
