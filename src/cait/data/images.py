"""Reading one image: from a file a user named (checked first, one-line errors), from a
file of a dataset (errors left to the caller, who skips and reports it), or from the bytes a
shard or a parquet file holds. Every source decodes through here, so every image is made
RGB and upright the same way."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cait.files import first_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNREADABLE_IMAGE_ERRORS",
    "PixelsUnreadable",
    "UnreadableImage",
    "check_image_file",
    "decode_image_bytes",
    "load_image",
    "open_image_bytes",
    "read_bytes",
    "read_image",
    "upright_rgb",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# The largest image file copied whole into memory (a shard member).
MAX_FILE_BYTES = 256 << 20
# Errors PIL raises for files that are not (complete) images.
UNREADABLE_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def upright_rgb(img: Image.Image, copy: bool = True) -> Image.Image:
    """Decode ``img`` now (so that truncated data fails here), turn it as EXIF says and make
    it RGB (transparency, 16-bit grey). ``copy=False``: an image that is RGB already is
    returned itself, not copied (for one that stays open; a file closed after it needs
    the copy)."""
    img.load()
    # phones store pictures as the sensor saw them and say how to turn them in EXIF
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF): PIL's conversion clips at 255, which turns most
        # of the picture white; keep the top 8 bits instead
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    return img if img.mode == "RGB" and not copy else img.convert("RGB")


def open_image_bytes(data: bytes) -> Image.Image:
    """An image held in memory (a shard member, a parquet cell) opened but not decoded (PIL
    reads its header); raises one of ``UNREADABLE_IMAGE_ERRORS`` when it is empty or not
    in a format PIL reads."""
    if not data:
        raise ValueError("empty image data")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's message names the buffer object: say what it is
        raise UnidentifiedImageError("not an image format PIL can read") from None


def decode_image_bytes(data: bytes) -> Image.Image:
    """An image held in memory (a shard member, a parquet cell), as :func:`load_image`
    makes it; raises one of ``UNREADABLE_IMAGE_ERRORS`` when it is not a whole image."""
    with open_image_bytes(data) as img:
        return upright_rgb(img)


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
        return upright_rgb(img)


URL_SCHEMES = ("http://", "https://")


class PixelsUnreadable(ValueError):
    """An opened image whose pixels cannot be decoded, raised by a transform that decodes
    itself (:class:`cait.data.decode.ResizedCrop`) in place of PIL's or the decoder's error
    (its first line), so that a source tells a bad file from a bug in the transform."""


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


def read_bytes(path: str | Path) -> bytes | str:
    """A dataset file's bytes (to copy into a shard), or why it cannot be read."""
    try:
        if Path(path).stat().st_size > MAX_FILE_BYTES:
            return f"over {MAX_FILE_BYTES >> 20} MiB: not an image file"
        return Path(path).read_bytes()
    except OSError as err:
        return err.strerror or str(err)


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
