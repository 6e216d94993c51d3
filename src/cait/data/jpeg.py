"""A JPEG handed over as its bytes (:class:`EncodedJpeg`) and the header walk that decides
which JPEGs may be (:func:`upright_jpeg_size`), for the fast path's crop step
(:mod:`cait.data.decode`): simplejpeg decodes those without PIL's header parse."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from cait.data.images import open_image_bytes

try:  # the fastjpeg extra
    import simplejpeg
except ImportError:
    simplejpeg = None

__all__ = ["JPEG_START", "EncodedJpeg", "upright_jpeg_size"]

# What upright_jpeg_size reads of a JPEG (ITU T.81, B.1): the start-of-image marker and
# the first byte of the next; the marker of the scan (the header ends there) and APP1
# (EXIF or XMP, either of which may say to turn the picture); the markers that carry no
# length (RST0-7, SOI, EOI) and the bytes that are no marker (fill FF, a stuffed 00, TEM).
JPEG_START, _START_OF_SCAN, _APP1 = b"\xff\xd8\xff", 0xDA, 0xE1
_NO_SEGMENT = frozenset({0xFF, 0x00, 0x01, *range(0xD0, 0xDA)})
# The frames (SOF markers, but DHT C4, JPG C8 and DAC CC) and those simplejpeg decodes as PIL
# does when 8-bit with 1 or 3 bands: baseline, extended and progressive Huffman; APP0's
# length in a whole JFIF segment (its identifier, version, units and densities).
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PLAIN_FRAMES, _APP0, _JFIF_LENGTH = frozenset({0xC0, 0xC1, 0xC2}), 0xE0, 16
# simplejpeg's colour spaces that PIL decodes as RGB or L, as simplejpeg does to RGB.
_RGB_OR_GREY = ("YCbCr", "RGB", "Gray")


class EncodedJpeg:
    """A JPEG file's bytes, not decoded, stored upright (no APP1 segment: neither EXIF nor
    XMP says to turn it) in RGB or grey, and its size from its header: what
    :func:`open_image` gives for such a file where simplejpeg is installed, so that
    :class:`ResizedCrop` decodes it with no PIL header parse. ``pil()``:
    the same file opened by PIL, for every other path (a DCT-scaled decode, another
    decoder, a file libjpeg warns about)."""

    def __init__(self, data: bytes, width: int, height: int, path: Path | None = None) -> None:
        self.data, self.size, self.path = data, (width, height), path

    def pil(self) -> Image.Image:
        """The file opened (not decoded) by PIL: from its path where it has one, so that
        PIL's errors name the file as the reference's do."""
        return Image.open(self.path) if self.path is not None else open_image_bytes(self.data)

    def close(self) -> None:
        """Nothing to close: it holds no file (as a PIL image, for ``with``)."""

    def __enter__(self) -> EncodedJpeg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.data)} bytes, size={self.size})"


def upright_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that simplejpeg decodes as PIL does and needs no
    turning (RGB or grey, no APP1 segment before the scan) nor warning (at most
    ``Image.MAX_IMAGE_PIXELS`` pixels); ``None`` for anything else (PIL opens those: other
    formats, EXIF or XMP, CMYK, headers it cannot walk, pictures past PIL's size limit)."""
    if simplejpeg is None or not data.startswith(JPEG_START):
        return None
    at = 2  # past the start-of-image marker
    while True:  # the segments before the scan: FF, marker, a 2-byte length (itself counted)
        if at + 4 > len(data) or data[at] != 0xFF or data[at + 1] in _NO_SEGMENT:
            return None  # fill bytes, a lone marker or a short file: PIL walks those
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == _START_OF_SCAN:
            break
        if marker == _APP1 or length < 2:
            return None
        if marker == _APP0 and length < _JFIF_LENGTH:
            return None  # a short JFIF segment PIL refuses: PIL says so
        if marker in _FRAMES and (
            marker not in _PLAIN_FRAMES
            or at + 10 > len(data)
            or data[at + 4] != 8
            or data[at + 9] not in (1, 3)
        ):
            return None  # lossless, 12-bit, arithmetic-coded, odd bands: PIL judges them
        at += 2 + length
    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colour not in _RGB_OR_GREY:
        return None
    # a picture larger than PIL lets through without a word (a decompression bomb: a few
    # KB that decode to gigabytes) goes to PIL, which warns or refuses as the reference does
    limit = Image.MAX_IMAGE_PIXELS
    return (width, height) if limit is None or width * height <= limit else None
