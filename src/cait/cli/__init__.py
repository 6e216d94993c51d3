"""The ``cait`` command line: each command parses its flags, builds a config and calls one
library function (``cait --help`` lists them).

One module per command, named as the command, holds its ``PURPOSE`` and ``EXAMPLES``, its
flags (``add_flags``) and its handler (``run``); both import the library they need when
called. :func:`main` adds a command's flags only once that command is chosen, so ``cait
--help``, ``cait --version`` and ``cait models`` load no training, data or export code
(timm, torchvision, gradio, onnx, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

# Only the commands' light modules at module level: a console script imports this module
# outside any handler, so a Ctrl-C during its imports could only end in a traceback.
from cait.cli import (
    ablate,
    app,
    attention,
    bench,
    convert,
    export,
    models,
    predict,
    residuals,
    shards,
    train,
)
from cait.cli import eval as evaluate  # the module; `eval` would hide the builtin
from cait.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    HelpFormatter,
    Stopped,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "EXIT_USER_ERROR",
    "INTERRUPTED",
    "build_parser",
    "main",
]

# The commands in the order `cait --help` lists them; each is named as its module.
COMMANDS: tuple[ModuleType, ...] = (
    models,
    convert,
    train,
    evaluate,
    predict,
    attention,
    residuals,
    ablate,
    export,
    bench,
    shards,
    app,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can raise: a bad value or file (ValueError and the errors of
    YAML and safetensors), a path that is missing, unreadable or not writable, a full
    disk, an unreachable URL (OSError); a diverged run arrives as a ValueError
    (training_stops). Anything else is a bug: a traceback."""
    import yaml
    from safetensors import SafetensorError

    return (ValueError, OSError, yaml.YAMLError, SafetensorError)


# What Ctrl-C before a command runs prints (one line; status EXIT_INTERRUPTED).
INTERRUPTED = "cait: interrupted"

# Library messages name a function's parameter; on the command line it is this flag.
_PARAMETER_FLAGS = {"`model_name`": "--model NAME", "`overwrite`": "--force"}


class _Commands(argparse._SubParsersAction):
    """The commands' subparsers; a command's flags may wait in ``pending`` until the
    command is chosen on the command line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Sequence[str],
        option_string: str | None = None,
    ) -> None:
        add_flags = self.pending.pop(values[0], None)
        if add_flags is not None:
            add_flags(self.choices[values[0]])
        super().__call__(parser, namespace, values, option_string)


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``cait`` parser with every command's flags; ``lazy``: a command's flags are
    added when the command is parsed (and the library its choices come from imported)."""
    parser = argparse.ArgumentParser(
        prog="cait",
        description="CaiT image classifiers (Touvron et al., 2021): train, evaluate, predict, "
        "look inside (attention maps, residual ratios), export and benchmark.",
        epilog="Run 'cait COMMAND --help' for a command's options. A user error prints one "
        "line and exits with status 2 (-v shows its traceback); Ctrl-C exits with 130.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    parser.add_argument("--version", action="version", version=f"cait {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands)
    for module in COMMANDS:
        name = module.__name__.rpartition(".")[2]
        p = sub.add_parser(
            name,
            help=module.PURPOSE,
            description=module.PURPOSE[0].upper() + module.PURPOSE[1:] + ".",
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(module.EXAMPLES).strip(), "  "),
            formatter_class=HelpFormatter,
        )
        p.set_defaults(run=module.run)
        if lazy:
            sub.pending[name] = module.add_flags
        else:
            module.add_flags(p)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("cait")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user's error ends in one line on stderr (its traceback with
    ``-v``) and exit status 2, a preempted run in 75, Ctrl-C in 130 (also while the
    command's flags and library are being imported, before it runs)."""
    try:
        return _run_command(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_command(argv: Sequence[str] | None) -> int:
    """:func:`main` once the command is known: its errors and Ctrl-C name the command."""
    user_errors = _user_errors()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(lazy=True).parse_args(argv)
    args.argv = argv
    rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""  # set by torchrun
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s",
    )
    prefix = f"{rank}cait {args.command}"
    try:
        return args.run(args)
    except Stopped as stop:
        print(f"{prefix}: {stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt as stop:
        if args.verbose:
            traceback.print_exc()
        # training's own interruption says what its output folder holds and how to go on
        detail = f"; {stop}" if str(stop) else ""
        print(f"{prefix}: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors as err:
        if args.verbose:
            traceback.print_exc()
        print(f"{prefix}: error: {_in_flags(_one_line(err))}", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line(err: BaseException) -> str:
    """An error as one line: an OSError names its file and reason in words, a multi-line
    message is joined with '; '."""
    import yaml

    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"  # not "[Errno 13] Permission denied: '...'"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    if isinstance(err, yaml.YAMLError):
        text = f"invalid YAML: {text}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _in_flags(message: str) -> str:
    for parameter, flag in _PARAMETER_FLAGS.items():
        message = message.replace(parameter, flag)
    return message
