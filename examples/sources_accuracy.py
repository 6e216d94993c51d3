"""The digits written as every source (folder, list, hf, shards), each trained with the
digits recipe and evaluated: the top-1 should match ``--data digits`` within a point.

    python examples/sources_accuracy.py OUT [--epochs 100] [--forms folder,list,hf,shards]

Prints a Markdown table (source, top-1, images/s, data wait) and writes it to OUT/table.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cait.data.sources import open_source
from cait.data.sources.convert import FORMS, write_as
from cait.inference import evaluate_checkpoint
from cait.training.config import apply_overrides, config_from_dict, load_recipe
from cait.training.run import train

ROOT = Path(__file__).resolve().parent.parent


def _source(form: str, out: Path) -> str:
    """The ``--data`` text of the digits as ``form``, written under ``out`` the first time
    (a rerun, with ``resume=auto``, continues the runs on the same files)."""
    if form == "digits":
        return "digits"
    where = out / form
    if not where.exists():
        return write_as(open_source("digits"), form, where)
    written = {"list": f"list:{where / 'list.csv'}", "hf": f"hf:{where / 'dataset'}"}
    return written.get(form, f"shards:{where}" if form == "shards" else str(where))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--forms", default=",".join(("digits",) + FORMS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        "| --data | val top-1 | train images/s (last epoch) | data wait (last epoch) |",
        "|---|---|---|---|",
    ]
    for form in args.forms.split(","):
        data = _source(form, args.out)
        start = time.perf_counter()
        overrides = [
            f"output={args.out / ('run-' + form)}",
            f"data.path={data}",
            f"epochs={args.epochs}",
            "progress=false",
            "tensorboard=false",
            f"threads={args.threads}",
            "resume=auto",
        ]
        config = config_from_dict(
            apply_overrides(load_recipe(ROOT / "recipes" / "digits.yaml"), overrides)
        )
        result = train(config)
        top1 = evaluate_checkpoint(str(result.output / "model.safetensors"), data)["top1"]
        last = result.history[-1]
        wait = 100 * last["data_wait_share"]
        rows.append(f"| `{form}` | {top1:.2f} | {last['images_per_s']:.0f} | {wait:.0f}% |")
        print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    table = "\n".join(rows) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
