"""Progress bars that appear only on a terminal, with log lines written above them.

A bar redraws itself with carriage returns: on a terminal that is one line updated in
place, but in a file or a pipe (``cait train ... 2> train.log``, a CI log) it is hundreds
of partial lines. So a bar is drawn only when standard error is a terminal; and while one
is drawn, the root logger's console handlers write through :func:`tqdm.tqdm.write`
(:func:`tqdm.contrib.logging.logging_redirect_tqdm`), which clears the bar, prints the
log line whole and redraws the bar below it, instead of splicing the line into the bar.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["on_terminal", "progress_bar"]


def on_terminal() -> bool:
    """Whether standard error is an interactive terminal (where bars are drawn)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


@contextlib.contextmanager
def progress_bar(total: int | None, description: str = "", enabled: bool = True) -> Iterator[tqdm]:
    """A bar of ``total`` steps, advanced with ``bar.update(1)``; closed on exit.

    It is drawn only when ``enabled`` and standard error is a terminal (otherwise it is a
    disabled bar: ``update`` and ``set_postfix`` do nothing); while it is drawn, log records
    go to the console above it.
    """
    shown = enabled and on_terminal()
    bar = tqdm(total=total, desc=description, disable=not shown, leave=False, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm() if shown else contextlib.nullcontext():
            yield bar
    finally:
        bar.close()
