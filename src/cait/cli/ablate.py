"""``cait ablate``: train a grid of the paper's ablation configurations and tabulate them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from cait.cli._common import DATA_HELP, positive_int, training_stops

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "train a grid of ablation configurations and tabulate them"
EXAMPLES = """
cait ablate --list
cait ablate --grid tiny --output runs/ablation
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.runtime import Device

    p.add_argument("--grid", default="default", help="tiny, default or paper (see --list)")
    p.add_argument("--data", help=f"{DATA_HELP} (default: the grid's)")
    p.add_argument("--output", help="folder for the runs, results.md and results.png")
    p.add_argument("--seeds", type=positive_int, help="number of seeds (default: the grid's)")
    p.add_argument("--epochs", type=positive_int, help="epochs per run (default: the grid's)")
    p.add_argument("--device", choices=get_args(Device), default="auto", help="where to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training setting for every run, e.g. data.batch_size=256 (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the grids and exit")


def run(args: argparse.Namespace) -> int:
    from cait.analysis.ablation import GRIDS, run_ablation

    if args.list:
        for g in GRIDS.values():
            print(
                f"{g.name:<9}{len(g.configs)} configurations x {len(g.seeds)} seed(s), "
                f"{g.epochs} epochs: {g.description}"
            )
        return 0
    if args.output is None:
        raise ValueError("--output is required (the folder for runs and results)")
    try:
        with training_stops():
            run_ablation(
                args.grid,
                args.data,
                args.output,
                seeds=args.seeds,
                epochs=args.epochs,
                device=args.device,
                progress=not args.no_progress,
                overrides=args.set,
            )
    except KeyboardInterrupt as err:
        # training's message says to resume with `cait train --resume auto`; the grid's runs
        # resume by running the same `cait ablate` again
        raise KeyboardInterrupt from err
    print((Path(args.output) / "results.md").read_text())
    return 0
