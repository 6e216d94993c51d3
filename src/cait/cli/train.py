"""``cait train``: a recipe, then the flags, then ``--set`` overrides, as one
:class:`~cait.training.config.TrainConfig`, passed to :func:`cait.training.train`; with
``--nproc N`` the command first hands itself to torchrun."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, get_args

from cait.cli._common import DATA_HELP, positive_int, threads_flag, training_stops

if TYPE_CHECKING:
    from cait.training.config import TrainConfig

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run", "train_config_from_args"]

PURPOSE = "train or fine-tune a model"
EXAMPLES = """
cait train --recipe recipes/digits.yaml --data digits --output runs/digits
cait train --recipe recipes/digits.yaml --data digits --output runs/digits --resume auto
cait train --recipe recipes/imagenet_pretrain.yaml --data /data/imagenet \\
    --output runs/s24 --set optim.lr=1e-3 --nproc 8
"""

# train flags -> config keys; a flag given on the command line overrides the recipe
_TRAIN_FLAGS = {
    "model": "model",
    "data": "data.path",
    "output": "output",
    "epochs": "epochs",
    "batch_size": "data.batch_size",
    "resume": "resume",
    "init_from": "init_from",
    "seed": "seed",
    "device": "device",
    "amp": "amp",
    "workers": "data.workers",
    "teacher": "distill.teacher",
    "teacher_weights": "distill.teacher_weights",
    "distillation": "distill.kind",
    "distill_alpha": "distill.alpha",
    "distill_tau": "distill.tau",
    "threads": "threads",
    "overwrite": "overwrite",
    "classes_by_position": "data.classes_by_position",
}

_BY_POSITION_HELP = (
    "a resumed checkpoint, a teacher or --init-from weights of ours whose class names differ "
    "from the data's: map the classes by index, with a warning (default: refused)"
)


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.runtime import Amp, Device
    from cait.training.config import DistillKind, TrainConfig

    config = TrainConfig().to_dict()

    def default(key: str) -> str:
        """A flag's default: the recipe's value, else the config's."""
        value: object = config
        for part in key.split("."):
            value = value[part]  # type: ignore[index]
        return f"(default: the recipe's, else {value})"

    p.add_argument("--recipe", help="a YAML recipe (see recipes/); flags and --set override it")
    p.add_argument("--model", help=f"a variant (cait models) or timm:NAME {default('model')}")
    p.add_argument("--data", help=f"{DATA_HELP} {default('data.path')}")
    p.add_argument("--output", help=f"the run folder (checkpoints, records) {default('output')}")
    p.add_argument("--epochs", type=positive_int, help=f"epochs to train {default('epochs')}")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"images per process and step {default('data.batch_size')}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config field, e.g. optim.lr=1e-3 (repeatable; docs/TRAINING.md)",
    )
    p.add_argument(
        "--resume",
        metavar="LAST_PT|auto",
        help="continue a run from its last.pt; 'auto': the output folder's run if it has one, "
        "else start fresh (what a restarted or requeued job uses)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the output folder holds (its files go once this run's first "
        "checkpoint is written); without it such a folder is refused",
    )
    p.add_argument(
        "--init-from",
        help="fine-tune from weights: a file, an http(s) URL or hf-hub:OWNER/NAME (the head "
        "is replaced when the class count differs)",
    )
    p.add_argument("--classes-by-position", action="store_true", help=_BY_POSITION_HELP)
    p.add_argument("--seed", type=int, help=f"random seed {default('seed')}")
    p.add_argument("--device", choices=get_args(Device), help=f"where to run {default('device')}")
    p.add_argument("--amp", choices=get_args(Amp), help=f"mixed precision {default('amp')}")
    p.add_argument("--workers", type=int, help=f"data-loading processes {default('data.workers')}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--teacher", help="distil from timm:NAME, torchvision:NAME or a cait checkpoint")
    p.add_argument("--teacher-weights", help="a weights file for a timm/torchvision teacher")
    p.add_argument(
        "--distillation",
        choices=get_args(DistillKind),
        help=f"the distillation loss {default('distill.kind')}",
    )
    p.add_argument(
        "--distill-alpha",
        type=float,
        help=f"weight of the distillation term {default('distill.alpha')}",
    )
    p.add_argument(
        "--distill-tau",
        type=float,
        help=f"temperature of soft distillation {default('distill.tau')}",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        help="N data-parallel processes on this machine, via torchrun (default: one process)",
    )
    threads_flag(p)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe, then explicit flags, then ``--set`` overrides, validated."""
    from cait.training.config import apply_overrides, config_from_dict, load_recipe

    data = load_recipe(args.recipe) if args.recipe else {}
    # a flag not given is None (store_true flags: False); 0 is a value (--workers 0)
    given = {name: getattr(args, name) for name in _TRAIN_FLAGS}
    flags = [
        f"{_TRAIN_FLAGS[name]}={json.dumps(value)}"
        for name, value in given.items()
        if value is not None and value is not False
    ]
    if args.no_progress:
        flags.append("progress=false")
    return config_from_dict(apply_overrides(data, flags + list(args.set)))


def run(args: argparse.Namespace) -> int:
    from cait.training import train

    config = train_config_from_args(args)
    if args.nproc and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(args.nproc, args.argv)
    with training_stops():  # Ctrl-C: training's TrainingInterrupted says what to do next
        result = train(config)
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = result.history[-1] if result.history else {}
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in result.output.iterdir())
    print(f"outputs in {result.output}: {', '.join(n for n in written if n[0] != '.')}")
    if last:
        print(f"final val top-1 {last['val_top1']:.2f}% (best {result.best_top1:.2f}%)")
    return 0


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by torchrun running the same command without ``--nproc``."""
    from cait.runtime import torchrun_command

    i = next(i for i, a in enumerate(argv) if a.split("=")[0] == "--nproc")
    rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2) :]
    command = torchrun_command(nproc, rest)
    # torchrun takes this process's place (same pid), so a scheduler's SIGTERM or a
    # Ctrl-C reaches torchrun, which passes it on to its workers
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
