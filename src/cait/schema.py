"""Frozen config dataclasses checked and built from their type annotations.

The annotation is the one definition of a field: a closed set of choices is a ``Literal``
(its values come from ``typing.get_args``), and both checks below read it.

- :func:`check_fields` validates a constructed config (call it first in ``__post_init__``);
  it converts nothing, so a config built in Python holds exactly what was passed.
- :func:`from_dict` builds a config from plain data (YAML, checkpoint metadata, overrides):
  unknown keys are rejected, values are converted the way YAML needs (lists to tuples,
  integers and number strings such as ``"5e-4"`` to floats, mappings to nested configs),
  then the class is constructed, so its ``__post_init__`` validates the rest. A ``float``
  read from data must be finite: no field takes ``inf`` or ``nan`` (YAML's ``.inf``,
  ``.nan``, the strings ``"inf"``, ``"nan"``); a constructed config is not held to that (a
  running sum that became ``nan`` is still written down, and refused when read back).

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``Any``, ``tuple[X, ...]`` and
``tuple[X, Y]``, ``dict[...]``, unions with ``None``, ``Literal[...]`` and nested dataclasses.
Messages name the field by its dotted path in the config tree (``optim.lr``).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

__all__ = ["check_fields", "convert", "convert_fields", "from_dict", "reject_unknown", "shown"]

T = TypeVar("T")

# what a value of each scalar type is called in messages (read by people writing YAML)
_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

# How much of a bad value a message shows: a value read from a file can be anything, a YAML
# alias bomb included (a list of lists whose repr is billions of characters), so messages
# show a bounded repr: 3 levels, the first 6 items of each container, 60 characters of a
# string, 40 digits of an integer, 80 characters of any other object, 200 characters in all.
_SHOWN = reprlib.Repr()  # its limits are attributes (keyword arguments only from 3.12)
_SHOWN.maxlevel = 3
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = 6
_SHOWN.maxstring = 60
_SHOWN.maxlong = 40
_SHOWN.maxother = 80
_SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """``repr(value)`` cut to a bounded size, for error messages (see ``_SHOWN``)."""
    text = _SHOWN.repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def check_fields(config: Any, where: str = "") -> None:
    """Raise ``ValueError`` unless every field of the dataclass ``config`` matches its
    annotation (a choice among its ``Literal``, an integer that is not a bool...).
    ``where`` is the config's path in the tree, for messages (``optim``)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        convert(getattr(config, f.name), hints[f.name], _join(where, f.name), strict=True)


def reject_unknown(
    cls: type, keys: Iterable[str], where: str = "", what: str = "config keys"
) -> None:
    """Raise ``ValueError`` naming every key that is not a field of ``cls``."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(keys) - set(known))
    if unknown:
        names = [_join(where, k) for k in unknown]
        raise ValueError(f"unknown {what} {names}; known: {known}")


def convert_fields(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` checked against the fields of ``cls`` and converted to their types, without
    constructing ``cls`` (for partial data such as overrides of a model config)."""
    reject_unknown(cls, data, where)
    hints = typing.get_type_hints(cls)
    return {k: convert(v, hints[k], _join(where, k)) for k, v in data.items()}


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """A validated ``cls`` from plain data (a ``cls`` instance is returned as it is); a
    field without a default that ``data`` lacks is named too."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, got {shown(data)}")
    fields = convert_fields(cls, data, where)
    missing = [
        _join(where, f.name)
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in fields
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where or cls.__name__} lacks {missing}")
    return cls(**fields)


def convert(value: Any, annotation: Any, where: str, *, strict: bool = False) -> Any:
    """``value`` as the type ``annotation`` declares, or ``ValueError`` naming ``where``.

    ``strict`` converts nothing (the check of a constructed config); otherwise lists become
    tuples, integers and number strings become floats and mappings become dataclasses.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, where, strict)
    if origin is Literal:
        # compared with the type too: True == 1, but a bool is not the choice 1
        if not any(type(value) is type(a) and value == a for a in args):
            raise ValueError(f"{where} must be one of {list(args)}, got {shown(value)}")
        return value
    if origin is tuple or annotation is tuple:
        return _convert_tuple(value, args, where, strict)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {shown(value)}")
        return value if strict else dict(value)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if strict and not isinstance(value, annotation):
            raise ValueError(
                f"{where} must be an instance of {annotation.__name__}, got {shown(value)}"
            )
        return from_dict(annotation, value, where)
    return _convert_scalar(value, annotation, where, strict)


def _convert_union(value: Any, args: tuple, where: str, strict: bool) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(value, arg, where, strict=strict)
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(errors[0])


def _convert_tuple(value: Any, args: tuple, where: str, strict: bool) -> tuple:
    if not isinstance(value, tuple if strict else list | tuple):
        raise ValueError(f"{where} must be a {'tuple' if strict else 'list'}, got {shown(value)}")
    if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        items = [args[0]] * len(value)
    elif args:  # tuple[X, Y]: exactly these
        if len(value) != len(args):
            raise ValueError(f"{where} must have {len(args)} items, got {shown(list(value))}")
        items = list(args)
    else:
        items = [Any] * len(value)
    return tuple(
        convert(v, t, f"{where}[{i}]", strict=strict)
        for i, (v, t) in enumerate(zip(value, items, strict=True))
    )


def _convert_scalar(value: Any, annotation: type, where: str, strict: bool) -> Any:
    if annotation is float:
        if isinstance(value, str) and not strict:
            try:  # YAML 1.1 reads "5e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not strict:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond any float
                ok = False
            if ok and not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {shown(value)}")
    else:
        ok = isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
    if not ok:
        kind = _SCALAR_NAMES.get(annotation, f"a {annotation.__name__}")
        raise ValueError(f"{where} must be {kind}, got {shown(value)}")
    return value
