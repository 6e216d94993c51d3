"""Digits-recipe epochs idle and beside busy competitor processes (docs/BENCHMARKS.md).

Trains the digits recipe (`recipes/digits.yaml`, as `cait train --recipe` runs it) for a few
epochs with 0, 1 and 3 busy processes started and stopped by this script
(`cait.bench.competitors`), and prints each run's epoch times and their median against
the idle median:

    .venv/bin/python examples/train_under_load.py                 # loads 0 1 3, 3 epochs
    .venv/bin/python examples/train_under_load.py --threads 2     # a pinned thread count

The first epoch also builds the data pipeline's workers, so the median is what counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cait.bench import competitors
from cait.training import train
from cait.training.config import apply_overrides, config_from_dict, load_recipe
from cait.training.records import EPOCH_SECONDS_KEY

ROOT = Path(__file__).resolve().parents[1]


def epoch_seconds(load: int, epochs: int, threads: int | None, folder: Path) -> list[float]:
    overrides = [f"output={folder / f'load{load}'}", f"epochs={epochs}", "progress=false"]
    if threads is not None:
        overrides.append(f"threads={threads}")
    config = config_from_dict(
        apply_overrides(load_recipe(ROOT / "recipes" / "digits.yaml"), overrides)
    )
    with competitors(load):
        result = train(config)
    rows = (result.output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)[EPOCH_SECONDS_KEY] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="pin the thread count (default: auto)")
    args = parser.parse_args()
    medians: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for load in args.loads:
            seconds = epoch_seconds(load, args.epochs, args.threads, Path(tmp))
            medians[load] = statistics.median(seconds)
            idle = medians.get(0)
            ratio = f", {medians[load] / idle:.2f}x idle" if idle else ""
            print(
                f"{load} competitors: epochs {', '.join(f'{s:.2f}' for s in seconds)} s; "
                f"median {medians[load]:.2f} s{ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
