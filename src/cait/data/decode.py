"""A faster decode path for the training transform: the random-resized crop drawn on the
file's size before the JPEG is decoded, so that it can be decoded at 1/2, 1/4 or 1/8 scale
in the DCT domain (``Image.draft``) when the crop will be shrunk that much anyway, and
resized in one step from its box; images stay uint8 until they reach the device, where
:class:`DeviceAugment` normalises and erases whole batches (as timm's ``PrefetchLoader``
does). docs/DATA.md ("Throughput") has the per-stage figures behind these choices.

The crops keep the reference's distribution: :func:`crop_params` is torchvision's and
timm's ``RandomResizedCrop.get_params``, the same algorithm with the same calls to Python's
``random``, on the full upright image size (a test holds them equal box for box).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from cait.data.images import (
    MAX_FILE_BYTES,
    UNREADABLE_IMAGE_ERRORS,
    PixelsUnreadable,
    open_image_bytes,
    upright_rgb,
)
from cait.data.jpeg import JPEG_START, EncodedJpeg, upright_jpeg_size
from cait.files import first_line

try:  # the fastjpeg extra: the fast path decodes JPEGs with it where it is installed
    import simplejpeg
except ImportError:
    simplejpeg = None

__all__ = [
    "ERASE_AREA",
    "ERASE_MIN_ASPECT",
    "DeviceAugment",
    "EncodedJpeg",
    "ResizedCrop",
    "ToPlanarTensor",
    "crop_params",
    "erase_batch",
    "finish_image",
    "normalize_batch",
    "open_image",
]

log = logging.getLogger(__name__)

# Who decodes the JPEGs the fast path crops with torch ("auto": simplejpeg if installed).
DECODERS = ("auto", "simplejpeg", "pil")

# The EXIF tag that says how a camera held the picture (1: upright as stored).
EXIF_ORIENTATION = 0x0112
# DCT-domain scales libjpeg decodes at (Image.draft), largest first.
DRAFT_SCALES = (8, 4, 2)
# timm's RandomErasing defaults (Zhong et al. 2017, timm/data/random_erasing.py): a box of
# 2 % to 1/3 of the image with an aspect ratio from 0.3 to 1/0.3.
ERASE_AREA = (0.02, 1 / 3)
ERASE_MIN_ASPECT = 0.3


def crop_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random-resized crop of a ``width`` x ``height``
    image: torchvision's ``RandomResizedCrop.get_params`` (timm's is the same), ten tries
    of a random area share and log-uniform aspect ratio, then a central crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            top = random.randint(0, height - h)
            left = random.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def open_image(source: str | Path | bytes) -> Image.Image | EncodedJpeg:
    """A file (a path, or its bytes: a tar member, a parquet cell) opened but not decoded,
    for :class:`ResizedCrop` to decode at the scale it needs: an upright RGB or grey JPEG as
    an :class:`EncodedJpeg` (where simplejpeg is installed, the file read once), anything
    else opened by PIL (which reads the header only). An empty file raises ``ValueError``, as
    :func:`cait.data.load_image` does; decoding errors (``UNREADABLE_IMAGE_ERRORS``) come
    later, from the transform."""
    if isinstance(source, bytes):
        if not source:
            raise ValueError("empty file")
        size = upright_jpeg_size(source)
        return EncodedJpeg(source, *size) if size is not None else open_image_bytes(source)
    # as before for anything but an upright JPEG: PIL opens the file itself (its errors
    # name it, as the reference's do); a FIFO or a device says size 0 and is not read
    size = Path(source).stat().st_size
    if size == 0:
        raise ValueError("empty file")
    if size > MAX_FILE_BYTES:  # not read into memory: PIL opens it, and judges it
        return Image.open(source)
    with open(source, "rb") as file:
        data = file.read(len(JPEG_START))
        if data == JPEG_START and simplejpeg is not None:
            data += file.read(MAX_FILE_BYTES + 1 - len(data))  # past it: PIL judges the file
    size = upright_jpeg_size(data) if len(data) <= MAX_FILE_BYTES else None
    return EncodedJpeg(data, *size, Path(source)) if size is not None else Image.open(source)


def finish_image(img: Image.Image | EncodedJpeg) -> Image.Image:
    """Decode ``img`` if it is not yet, and make it upright RGB as
    :func:`cait.data.load_image` does, without copying an RGB image."""
    return upright_rgb(img.pil() if isinstance(img, EncodedJpeg) else img, copy=False)


def _undecoded_jpeg(img: Image.Image) -> bool:
    """A JPEG not decoded yet and stored upright: one ``draft`` can shrink it."""
    return (
        isinstance(img, JpegImageFile)
        and bool(img.tile)
        and img.getexif().get(EXIF_ORIENTATION, 1) == 1
    )


# PIL filters torch resizes uint8 images with, antialiased, by the same kernels (bicubic's
# a = -0.5 as PIL's; torch's uint8 AVX2 path is 3-4x faster than PIL's on one core).
TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


@functools.cache
def _say_no_simplejpeg() -> None:
    """Log, once, that the fast path decodes with PIL for want of simplejpeg."""
    log.info(
        "simplejpeg is not installed: the fast path decodes JPEGs with PIL, about 0.3 ms an "
        "image slower (pip install simplejpeg; the same pixels either way)"
    )


def _jpeg_decoder(decoder: str) -> str:
    """The decoder ``decoder`` names: ``"auto"`` is simplejpeg where it is installed (the
    ``fastjpeg`` extra), else PIL (said once in the log)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ValueError("decoder simplejpeg needs the simplejpeg package: pip install simplejpeg")
    if decoder != "auto":
        return decoder
    if simplejpeg is None:
        _say_no_simplejpeg()
    return "pil" if simplejpeg is None else "simplejpeg"


def _decode_jpeg(img: JpegImageFile | EncodedJpeg) -> torch.Tensor | Image.Image:
    """All of an undecoded upright JPEG's pixels as a uint8 ``(C, H, W)`` RGB tensor
    (channels-last in memory), decoded by simplejpeg's libjpeg-turbo: the same pixels as
    PIL's (a test holds them equal) without PIL's copy into its 4-byte pixels and back.
    A file libjpeg warns about (PIL decodes through such warnings, or says what is wrong)
    goes to PIL instead, so that what is read or skipped is what the reference reads."""
    if isinstance(img, EncodedJpeg):
        data = img.data
    else:
        img.fp.seek(0)
        data = img.fp.read()
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return finish_image(img)
    img.close()
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _torch_resize(
    pixels: torch.Tensor, box: tuple[int, int, int, int], size: int, mode: str
) -> torch.Tensor:
    """The integer ``box`` of uint8 ``(C, H, W)`` ``pixels`` at ``size`` x ``size`` by torch's
    antialiased uint8 resize, as a ``(C, size, size)`` tensor (channels-last in memory)."""
    left, top, right, bottom = box
    # the box alone, copied channels-last (1, C, H, W): the resize reads it contiguously, and
    # torch then allocates the output channels-last too (pytorch#68430; torchvision's resize
    # does the same), so that PIL gets its pixel order without a transposing copy
    crop = pixels[None, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(crop, size=(size, size), mode=mode, antialias=True)[0]


def _pil_pixels(img: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 ``(C, H, W)`` view (channels-last in memory)."""
    with warnings.catch_warnings():  # PIL's array is read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 ``(C, H, W)`` tensor (a view of one copy of its pixels)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _to_image(pixels: torch.Tensor) -> Image.Image:
    """A uint8 ``(C, H, W)`` tensor as an RGB image."""
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


class ResizedCrop:
    """The random-resized crop of ``size`` x ``size`` (``scale``, ``ratio``: the recipe's),
    decoded at the smallest DCT scale that keeps the crop at least ``size`` pixels on each
    side (``draft``), and resized from its box in one step, by torch's uint8 resize
    (``engine="torch"``, bicubic and bilinear) or PIL's (``"pil"``, with ``reducing_gap``).
    With the torch engine an upright RGB or grey JPEG that is not drafted is decoded by
    simplejpeg (``decoder="simplejpeg"``, or ``"auto"`` where it is installed: the same
    pixels as PIL's ``"pil"``, sooner).
    Returns a PIL image, or with ``to_tensor`` a uint8 ``(C, H, W)`` tensor (for steps that
    take tensors: the flip), which saves a conversion each way.

    Takes an image from :func:`open_image` (not decoded: the fast path) or a decoded one."""

    #: the data sources hand it images opened, not decoded (cait.data.sources.base)
    decodes_itself = True

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: Image.Resampling = Image.Resampling.BICUBIC,
        draft: bool = True,
        engine: str = "torch",
        reducing_gap: float | None = None,
        to_tensor: bool = False,
        decoder: str = "auto",
    ) -> None:
        if engine not in ("torch", "pil"):
            raise ValueError(f"engine must be torch or pil, got {engine!r}")
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        self.draft = draft
        self.engine = engine if interpolation in TORCH_MODES else "pil"
        self.reducing_gap = reducing_gap
        self.to_tensor = to_tensor
        self.decoder = _jpeg_decoder(decoder)

    def plan(
        self, img: Image.Image | EncodedJpeg
    ) -> tuple[Image.Image | EncodedJpeg, tuple[float, float, float, float]]:
        """Draw the crop on the full upright size, set the DCT scale on a JPEG not yet
        decoded, and return the image and the crop box in its (possibly reduced) pixels."""
        if getattr(img, "tile", None) and not _undecoded_jpeg(img):
            img = finish_image(img)  # an EXIF-rotated or non-JPEG file: decode it whole first
        width, height = img.size
        top, left, h, w = crop_params(width, height, self.scale, self.ratio)
        reduce = 1
        shrink = min(w, h) / self.size
        if self.draft and shrink >= DRAFT_SCALES[-1]:
            if isinstance(img, EncodedJpeg):
                img = img.pil()  # PIL's draft decodes at the DCT scale
            if _undecoded_jpeg(img):
                k = next(s for s in DRAFT_SCALES if s <= shrink)
                drafted = img.draft("RGB", (max(width // k, 1), max(height // k, 1)))
                if drafted is not None:
                    reduce = width / drafted[1][2]
        if reduce == 1:
            return img, (left, top, left + w, top + h)
        return img, (left / reduce, top / reduce, (left + w) / reduce, (top + h) / reduce)

    def _torch_box(self, box: tuple[float, float, float, float]) -> bool:
        """Whether torch resizes ``box`` (an integer box; a drafted one is fractional)."""
        return self.engine == "torch" and all(isinstance(v, int) for v in box)

    def decode(
        self, img: Image.Image | EncodedJpeg, box: tuple[float, float, float, float]
    ) -> Image.Image | torch.Tensor:
        """``img`` from :meth:`plan` decoded for its crop ``box``: by simplejpeg into a uint8
        ``(C, H, W)`` tensor where torch resizes the box of an undecoded upright RGB or grey
        JPEG (``decoder="simplejpeg"``), else by PIL (upright RGB, as :func:`finish_image`)."""
        simple = self.decoder == "simplejpeg" and self._torch_box(box)
        if isinstance(img, EncodedJpeg):
            return _decode_jpeg(img) if simple else finish_image(img)
        if simple and _undecoded_jpeg(img) and img.mode in ("RGB", "L"):
            return _decode_jpeg(img)
        return finish_image(img)

    def resize(
        self, img: Image.Image | torch.Tensor, box: tuple[float, float, float, float]
    ) -> Image.Image | torch.Tensor:
        """The crop ``box`` of ``img`` (what :meth:`decode` gave) at ``size`` x ``size``; a
        fractional box (a drafted image) goes to PIL, which takes one."""
        if self._torch_box(box):
            if isinstance(img, torch.Tensor):
                pixels = img
            else:  # PIL's box alone copied out, then read as RGB
                pixels, box = _pil_pixels(img.crop(box)), (0, 0, box[2] - box[0], box[3] - box[1])
            out = _torch_resize(pixels, box, self.size, TORCH_MODES[self.interpolation])
            return out if self.to_tensor else _to_image(out)
        out = img.resize(
            (self.size, self.size), self.interpolation, box=box, reducing_gap=self.reducing_gap
        )
        return _to_tensor(out) if self.to_tensor else out

    def __call__(self, img: Image.Image | EncodedJpeg) -> Image.Image | torch.Tensor:
        """The crop of ``img`` (opened, decoded or not); pixels that cannot be decoded raise
        :class:`~cait.data.images.PixelsUnreadable`, and only those."""
        try:
            img, box = self.plan(img)
            pixels = self.decode(img, box)
        except UNREADABLE_IMAGE_ERRORS as err:
            raise PixelsUnreadable(first_line(err)) from err
        return self.resize(pixels, box)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio="
            f"{tuple(round(r, 4) for r in self.ratio)}, interpolation={self.interpolation.name}"
            f", draft={self.draft}, engine={self.engine}, reducing_gap={self.reducing_gap}"
            f", to_tensor={self.to_tensor}, decoder={self.decoder})"
        )


class ToPlanarTensor:
    """A PIL image as a contiguous uint8 ``(C, H, W)`` tensor, band by band (PIL's
    ``split``); a tensor passes through. timm's ``MaybePILToTensor`` gives the same pixels
    as a channels-last view, which collating then transposes: this is 2-3x cheaper."""

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return img
        bands = img.split()
        out = np.empty((len(bands), img.size[1], img.size[0]), dtype=np.uint8)
        for k, band in enumerate(bands):
            out[k] = np.asarray(band)
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def normalize_batch(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A uint8 ``(B, C, H, W)`` batch as ``dtype``, normalised as ``ToTensor`` then
    ``Normalize(mean, std)`` would: ``(x - 255 mean) / (255 std)``, on the batch's device."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"expected a uint8 (B, C, H, W) batch, got {images.dtype} of shape "
            f"{tuple(images.shape)}"
        )
    shape = (1, -1, 1, 1)
    scaled_mean = torch.tensor([255 * m for m in mean], dtype=dtype, device=images.device)
    scaled_std = torch.tensor([255 * s for s in std], dtype=dtype, device=images.device)
    return images.to(dtype).sub_(scaled_mean.view(shape)).div_(scaled_std.view(shape))


def _erase_one(image: torch.Tensor, probability: float, mode: str, count: int) -> None:
    """timm's ``RandomErasing._erase`` on one normalised ``(C, H, W)`` image, in place, with
    the same calls to ``random`` and to ``torch`` (so a seed gives timm's boxes)."""
    if random.random() > probability:
        return
    chan, img_h, img_w = image.shape
    area = img_h * img_w
    count = 1 if count == 1 else random.randint(1, count)
    log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for _ in range(count):
        for _ in range(10):
            target_area = random.uniform(*ERASE_AREA) * area / count
            aspect_ratio = math.exp(random.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < img_w and h < img_h:
                top = random.randint(0, img_h - h)
                left = random.randint(0, img_w - w)
                size = (chan, h, w) if mode == "pixel" else (chan, 1, 1)
                fill = torch.empty(size, dtype=image.dtype, device=image.device)
                image[:, top : top + h, left : left + w] = (
                    fill.zero_() if mode == "const" else fill.normal_()
                )
                break


def erase_batch(
    images: torch.Tensor, probability: float, mode: str = "pixel", count: int = 1
) -> torch.Tensor:
    """Random erasing (timm's ``RandomErasing(probability, mode=mode, max_count=count)``)
    on each image of a normalised ``(B, C, H, W)`` batch, in place; returns the batch."""
    if mode not in ("const", "rand", "pixel"):
        raise ValueError(f"erasing mode must be const, rand or pixel, got {mode!r}")
    if probability > 0:
        for image in images:
            _erase_one(image, probability, mode, count)
    return images


class DeviceAugment:
    """The training transform's last steps for a batch of uint8 images on the device:
    normalise, then random erasing. The training loop calls it on each batch after moving
    it to the device and before mixup::

        images = augment(images.to(device, non_blocking=True))
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = normalize_batch(images, self.mean, self.std, self.dtype)
        return erase_batch(out, self.re_prob, self.re_mode, self.re_count)
