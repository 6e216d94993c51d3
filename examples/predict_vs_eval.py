"""`cait predict --output` against `cait eval` on the same image folder: images/s of each
(alternating rounds in one process, the medians and the median of per-round ratios), and
that the results file holds every image once. The figures of docs/DEPLOY.md.

    python examples/predict_vs_eval.py CHECKPOINT FOLDER [--rounds 3] [--batch-size 64]

FOLDER holds class folders (what `cait eval --data FOLDER` reads); predict reads every image
under it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from cait.inference import evaluate_checkpoint, predict_to_file, read_rows
from cait.threads import use_threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()
    use_threads(None)
    load_before = os.getloadavg()
    options = dict(batch_size=args.batch_size, workers=args.workers, precision=args.precision)
    rates: dict[str, list[float]] = {"eval": [], "predict": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["eval", "predict"] if r % 2 == 0 else ["predict", "eval"]
            for what in order:
                if what == "eval":
                    result = evaluate_checkpoint(args.checkpoint, args.folder, **options)
                    rates["eval"].append(result["images_per_s"])
                    images = result["images"]
                else:
                    output = Path(tmp) / f"round{r}.csv"
                    result = predict_to_file(args.checkpoint, [args.folder], output, **options)
                    rates["predict"].append(result["images_per_s"])
                    rows = read_rows(output)
        paths = [row["path"] for row in rows]
    print(
        json.dumps(
            {
                "images": images,
                "rows": len(rows),
                "unique_paths": len(set(paths)),
                "precision": args.precision,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "images_per_s": {k: statistics.median(v) for k, v in rates.items()},
                "rounds": rates,
                "predict_vs_eval": statistics.median(
                    a / b for a, b in zip(rates["predict"], rates["eval"], strict=True)
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
