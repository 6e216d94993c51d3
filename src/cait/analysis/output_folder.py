"""The output folder of a tool that writes pictures and tables (``cait attention``, ``cait
residuals``): the run-folder rules for a folder written whole.

- A folder that holds the tool's earlier outputs is replaced only with ``overwrite``; one
  that holds anything else is refused even with it (choose another output).
- The folder is filled beside its place and swapped in once complete: a failure or Ctrl-C
  leaves the earlier outputs as they were and nothing half-written.
- One writer per output (:class:`cait.files.OutputLock`); a second is refused, and what a
  writer killed mid-way left is removed by the next.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cait.files import OutputLock, write_folder_atomically

__all__ = ["check_output_folder", "write_output_folder"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How many of a folder's names a refusal shows.
_SHOWN = 3


def check_output_folder(
    output: str | os.PathLike[str], tool: str, owns: Callable[[str], bool], overwrite: bool
) -> None:
    """Refuse an ``output`` that ``cait {tool}`` may not write: not a folder, a folder of
    its earlier outputs (files whose name ``owns`` accepts) without ``overwrite``, and a
    folder holding anything else even with it. An empty folder is written."""
    output = Path(output)
    if output.name in ("", ".", ".."):
        raise ValueError(
            f"the output {str(output)!r} names a folder to write in, not the folder to "
            f"write: give the {tool} outputs a folder of their own, e.g. {output / tool}"
        )
    if os.path.lexists(output) and not output.is_dir():
        raise ValueError(f"output {output} is not a folder")
    if not output.is_dir():
        return
    entries = sorted(output.iterdir())
    others = [p.name for p in entries if p.is_symlink() or not p.is_file() or not owns(p.name)]
    if others:
        raise ValueError(
            f"{output} holds what cait {tool} does not write ({_show(others)}): refusing to "
            "replace it, even with `overwrite`; choose another output"
        )
    if entries and not overwrite:
        raise ValueError(
            f"{output} exists: refusing to replace it without `overwrite` (it holds earlier "
            f"{tool} outputs: {_show([p.name for p in entries])})"
        )


def write_output_folder(
    output: str | os.PathLike[str],
    tool: str,
    owns: Callable[[str], bool],
    overwrite: bool,
    write: Callable[[Path], T],
) -> T:
    """Fill ``output`` through ``write(folder)`` (returning what it returns) under the
    rules of :func:`check_output_folder`, holding the output's lock; ``write`` fills a
    folder beside ``output`` that replaces it once ``write`` returned."""
    output = Path(output)
    check_output_folder(output, tool, owns, overwrite)
    with OutputLock(output, what=f"cait {tool}"):
        check_output_folder(output, tool, owns, overwrite)  # again: it may have changed
        written: list[T] = []
        write_folder_atomically(
            output, lambda folder: written.append(write(folder)), interruptible=True
        )
    return written[0]


def _show(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
