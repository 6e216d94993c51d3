"""What a request to ``cait app`` may name: only a regular file inside the app's own upload
folder, checked before anything opens it, then read and checked as ``cait predict`` reads
an image (:func:`cait.inference.read_checked_image`), with messages in the page's words."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from PIL import Image

from cait.data.images import UnreadableImage
from cait.inference import read_checked_image

__all__ = ["NOT_UPLOADED", "check_image", "uploaded", "uploaded_file"]

# The answer to a request that names any file but one uploaded to this app (a path elsewhere,
# a folder, a link out of the upload folder, a named pipe, nothing at all): the same words
# for every reason, so that it tells nothing about the server's files.
NOT_UPLOADED = "This app reads only images uploaded to it (gradio_client: handle_file)."


def uploaded_file(path: object, uploads: str | Path) -> Path:
    """The regular file ``path`` names inside the folder ``uploads``, links resolved,
    checked before anything opens it; anything else raises ``ValueError(NOT_UPLOADED)``.

    Gradio checks that a file came through its upload only for the payloads it decodes; the
    image events (``preprocess=False``) and ``/predict`` (a dict parameter) get the path as
    the client sent it, so the app checks it here.
    """
    try:
        real = Path(os.path.realpath(path, strict=True))  # type: ignore[arg-type]
        inside = real.is_relative_to(os.path.realpath(uploads))
        regular = stat.S_ISREG(real.stat().st_mode)  # a stat: a named pipe is not opened
    except (OSError, TypeError, ValueError):  # missing, a link loop, not a str, a NUL byte
        raise ValueError(NOT_UPLOADED) from None
    if not (inside and regular):
        raise ValueError(NOT_UPLOADED)
    return real


def uploaded(payload: object, uploads: Path) -> Path | None:
    """The uploaded file of an image input's raw payload, ``None`` for no image. Its events
    skip Gradio's decoding, which fails on a file that is not an image with a generic error
    and no message."""
    if payload is None:
        return None
    return uploaded_file(payload.get("path") if isinstance(payload, dict) else None, uploads)


def check_image(path: str | Path, patch_size: int) -> Image.Image:
    """:func:`cait.inference.read_checked_image` in the page's words: a one-line
    ``ValueError`` that names the file as uploaded (not the server's copy of it)."""
    path = Path(path)
    try:
        return read_checked_image(path, patch_size)
    except UnreadableImage as err:
        message = f"{path.name} is not an image this app can read ({err.reason})"
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
    raise ValueError(message.replace(str(path), path.name))
