"""What the commands share: the exit statuses, the help formatter, flags several commands
take, and training's own ends in the command line's terms.

Nothing here imports the library at module level: ``cait --help`` imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:  # no library import at run time: `cait --help` imports this module
    from cait.inference.calibration import Calibration

__all__ = [
    "CHECKPOINT_HELP",
    "DATA_HELP",
    "PRECISION_HELP",
    "calibrate_flags",
    "calibration",
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "EXIT_USER_ERROR",
    "MODEL_HELP",
    "HelpFormatter",
    "Stopped",
    "crop_ratio",
    "force_flag",
    "picture_flags",
    "precision_flag",
    "positive_int",
    "threads_flag",
    "training_stops",
]

# Exit statuses: 2 for a failure the user can fix (a bad path, value or file; argparse's
# own), 75 for a run stopped by a preemption signal with its last.pt written (EX_TEMPFAIL
# of sysexits.h: try again, with --resume auto), 130 for Ctrl-C (128 + SIGINT, the shell's
# convention).
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

MODEL_HELP = "the variant, for official or timm weights that carry no config (see cait models)"
CHECKPOINT_HELP = (
    "model.safetensors, last.pt or best.pt of a cait run; or official/timm weights "
    "(a file, an http(s) URL or hf-hub:OWNER/NAME) with --model"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (when it has one worth showing); the
    examples in the epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # by identity, not `in (None, False, ...)`: 0 == False, so a default of 0 was hidden
        shown = not (
            default is None or default is False or default == [] or default == argparse.SUPPRESS
        )
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse then prints a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def crop_ratio(text: str) -> float:
    """An argparse type for ``--crop-pct``: a finite number in (0, 1], no smaller than the
    floor that keeps the eval resize (``img_size / crop_pct``) bounded."""
    from cait.data.transforms import CROP_PCT_WHY
    from cait.models.checks import CROP_PCT_RANGE

    low = CROP_PCT_RANGE[0]
    expected = f"expected a ratio in [{low}, 1]"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{expected}, got {text[:40]}: not a finite number")
    if value < low:
        raise argparse.ArgumentTypeError(f"{expected}, got {text[:40]}: {CROP_PCT_WHY}")
    if value > 1:
        raise argparse.ArgumentTypeError(f"{expected}, got {text[:40]}")
    return value


# what --data may name (cait.data.sources)
DATA_HELP = "digits, an image folder, shards:DIR, hf:DIR or list:FILE"


PRECISION_HELP = (
    "fp32; bf16 (autocast: a CPU with avx512_bf16 or amx_bf16, or CUDA); int8 (the linear "
    "layers quantized, CPU only; activation scales per batch, or fixed by --calibrate). The "
    "checkpoint file is not changed"
)


def precision_flag(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--precision fp32|bf16|int8`` (:mod:`cait.precision`; no torch import here)."""
    kwargs.setdefault("default", "fp32")
    kwargs.setdefault("help", PRECISION_HELP)
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), **kwargs)


def calibrate_flags(p: argparse.ArgumentParser) -> None:
    """``--calibrate SOURCE`` and ``--calibrate-images N``: int8's static activation scales
    (:mod:`cait.inference.calibration`)."""
    p.add_argument(
        "--calibrate",
        metavar="SOURCE",
        help="int8 only: fix the activation scales from images of this source's train split, "
        f"or of the whole source where it is one split ({DATA_HELP}), for faster int8 whose "
        "predictions do not depend on the batch",
    )
    p.add_argument(
        "--calibrate-images",
        type=positive_int,
        default=256,  # cait.inference.calibration.CALIBRATION_IMAGES (a test holds them equal)
        metavar="N",
        help="how many images --calibrate reads (a seeded sample)",
    )


def calibration(args: argparse.Namespace) -> Calibration | None:
    """The :class:`~cait.inference.calibration.Calibration` the flags ask for, or ``None``."""
    if args.calibrate is None:
        return None
    from cait.inference.calibration import Calibration

    return Calibration(args.calibrate, args.calibrate_images)


def picture_flags(p: argparse.ArgumentParser) -> None:
    """What a command that draws maps over images takes (attention, explain): the style,
    the resolution, the device, ``--force`` and ``--threads``."""
    from cait.analysis.attention import MapStyle  # light: the picture code loads when drawn
    from cait.runtime import DeviceType

    p.add_argument(
        "--style",
        choices=get_args(MapStyle),
        default="blocks",
        help="each token as a block of pixels, or a smoothed overlay",
    )
    p.add_argument(
        "--img-size", type=positive_int, help="run at this resolution (default: the model's)"
    )
    # no "auto": a picture is computed where asked
    p.add_argument("--device", choices=get_args(DeviceType), default="cpu", help="where to run")
    force_flag(p, "the earlier outputs in --output (never a folder holding other files)")
    threads_flag(p)


def force_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--force``: replace ``what`` the command wrote earlier (the library's
    ``overwrite``), never anything else."""
    p.add_argument("--force", action="store_true", help=f"replace {what}")


def threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads``: a command that computes in this process passes it to
    :func:`cait.threads.use_threads` first (train: through its config)."""
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch intra-op threads (default: as many as the cores other processes leave "
        "free, up to torch's count, re-checked every 2 s; OMP_NUM_THREADS also pins it)",
    )


class Stopped(Exception):
    """A command that stopped before its end as asked, not by an error: ``cait COMMAND:
    <message>`` is printed and the process exits with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def training_stops() -> Iterator[None]:
    """Training's own ends in the command line's terms: a preempted run (its ``last.pt``
    written) stops with :data:`EXIT_PREEMPTED`; a run whose loss diverged is the user's to
    fix (a learning rate, say), a one-line error."""
    from cait.training.engine import NonFiniteLossError
    from cait.training.preemption import TrainingPreempted

    try:
        yield
    except TrainingPreempted as stop:
        raise Stopped(str(stop), EXIT_PREEMPTED) from stop
    except NonFiniteLossError as err:
        raise ValueError(str(err)) from err
