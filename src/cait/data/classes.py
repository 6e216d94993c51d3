"""Class names where a model meets data or another model: one comparison, one message.

A model's output index ``i`` means its ``i``-th class name; data labels an image by the
index of its class among the data's names (sorted class folders, or the digits ``0``-``9``).
Two lists that differ at any index would score, resume, distil or fine-tune against shifted
labels without a word, so :func:`check_class_names` refuses them in one line naming the
first difference; ``by_position`` (``--classes-by-position``, the config's
``data.classes_by_position``) is the explicit choice to map them by index anyway, which it
logs as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["BY_POSITION_FLAG", "check_class_names", "first_class_mismatch"]

logger = logging.getLogger(__name__)

# The flag of `cait eval` and `cait train` (config key data.classes_by_position) that maps
# class lists by position; the refusals name it.
BY_POSITION_FLAG = "--classes-by-position"
# A class name shown in a message is cut to this many characters (names are read from
# files, and a message never renders an unbounded value).
_SHOWN = 60


def _shown(name: str) -> str:
    return repr(name) if len(name) <= _SHOWN else repr(name[:_SHOWN]) + "..."


def first_class_mismatch(
    ours: Sequence[str], theirs: Sequence[str], labels: tuple[str, str]
) -> str | None:
    """The first difference between two lists of class names in words (``labels`` name
    whose they are: ``("the checkpoint", "the data")``), or ``None`` when they agree: a
    count that differs, else the first index whose names differ."""
    mine, other = labels
    if len(ours) != len(theirs):
        return f"{mine} has {len(ours)} classes, {other} {len(theirs)}"
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            return f"class {index} of {mine} is {_shown(a)}, of {other} {_shown(b)}"
    return None


def check_class_names(
    ours: Sequence[str],
    theirs: Sequence[str],
    labels: tuple[str, str],
    where: str,
    by_position: bool = False,
) -> None:
    """Refuse two lists of class names that differ: a one-line ``ValueError`` starting with
    ``where`` (the file or setting) and naming the first difference. With ``by_position``
    the difference is logged as a warning and the classes go by index, as long as every
    index of ``theirs`` (the labels) is one of ``ours`` (the model's outputs)."""
    problem = first_class_mismatch(ours, theirs, labels)
    if problem is None:
        return
    if not by_position:
        raise ValueError(
            f"{where}: {problem}; the labels would not mean the model's classes (pass "
            f"{BY_POSITION_FLAG} to map the classes by position)"
        )
    if len(theirs) > len(ours):
        raise ValueError(
            f"{where}: {problem}; by position, {labels[1]}'s classes past the first "
            f"{len(ours)} have no class of {labels[0]}"
        )
    logger.warning("%s: %s; the classes are mapped by position, as asked", where, problem)
