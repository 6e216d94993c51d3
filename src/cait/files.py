"""Reading and writing files safely: the one atomic writer, and loading without unpickling.

Every file cait writes (run checkpoints, weights, converted checkpoints) goes through
:func:`atomic_write`, and every torch file it reads goes through :func:`load_file_safely`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

__all__ = ["atomic_write", "load_file_safely"]

# Files cait writes are readable by everyone, like any file a user writes.
FILE_MODE = 0o644
# torch.save writes a zip archive; the legacy format (torch < 1.6) is a pickle stream, which
# opens with the PROTO opcode 0x80 (pickle protocol 2 and later).
_ZIP_START = b"PK\x03\x04"
_PICKLE_START = b"\x80"


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(temporary_path)``, then rename it over ``path``.

    The temporary file, ``.NAME.tmp``, sits beside ``path`` (same file system, so the rename
    is atomic) and is flushed to disk before the rename: a write that fails, a process
    killed or a disk filling up mid-write leave the previous ``path`` intact. A failed write
    removes the temporary file; a killed process leaves it, and the next write replaces it.
    Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_file_safely(path: str | os.PathLike[str]) -> Any:
    """A ``.safetensors`` file, or a torch file read with ``weights_only=True``; a file holding
    other objects raises ``ValueError`` instead of being unpickled."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    with open(path, "rb") as f:
        start = f.read(len(_ZIP_START))
    if not start.startswith((_ZIP_START, _PICKLE_START)):
        raise ValueError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"containers, and loading never unpickles arbitrary code ({_first_line(err)})"
        ) from err
    except (EOFError, KeyError, RuntimeError) as err:  # what torch.load raises on other bytes
        raise ValueError(
            f"{path} is not a torch checkpoint: torch cannot read it "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err


def _first_line(err: BaseException) -> str:
    """An error's message cut to its first line (errors reach users on one line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
