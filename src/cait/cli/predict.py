"""``cait predict``: the top classes of image files, or of every image in folders into a
results file."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, get_args

from cait.cli._common import (
    CHECKPOINT_HELP,
    MODEL_HELP,
    calibrate_flags,
    calibration,
    force_flag,
    positive_int,
    precision_flag,
    threads_flag,
)

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "precision_flag", "run"]

PURPOSE = "the top classes of image files, or of folders into a results file"
EXAMPLES = """
cait predict --checkpoint runs/demo/model.safetensors runs/demo/samples/*.png
cait predict --checkpoint runs/demo/model.safetensors photos/ --output results.csv
cait predict --checkpoint runs/demo/model.safetensors photos/ --output results.csv --resume
cait predict --checkpoint runs/demo/model.safetensors photos/ --output r.parquet --precision int8
cait predict --checkpoint runs/demo/model.safetensors photos/ --precision int8 --calibrate digits
cait predict --checkpoint runs/demo/model.safetensors --data digits --output digits.csv
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.runtime import Device

    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files (PNG, JPEG, ...) or folders (every image under them)",
    )
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="predict a data source instead of images: digits, a folder, shards:DIR, "
        "hf:DIR or list:FILE (its labels fill a label column)",
    )
    p.add_argument(
        "--split",
        choices=("eval", "val", "train"),
        default="eval",
        help="the split of --data (eval: what cait eval reads)",
    )
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--device", choices=get_args(Device), default="auto", help="where to run")
    precision_flag(p)
    calibrate_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write one row per image to FILE (.csv, .jsonl or .parquet): path, top1, prob1, "
        "... topK, probK",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue a stopped --output run, skipping its rows"
    )
    force_flag(p, "an --output file written before")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=0, help="image-reading processes")
    threads_flag(p)


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    for row in rows:
        if as_json:
            print(json.dumps(row), flush=True)
            continue
        print(row["path"])
        rank = 1
        while f"top{rank}" in row:
            print(f"  {row[f'prob{rank}']:7.2%}  {row[f'top{rank}']}")
            rank += 1


def _batched(args: argparse.Namespace) -> int:
    from cait.inference import predict_to_file

    summary = predict_to_file(
        args.checkpoint,
        args.images,
        output=args.output,
        topk=args.topk,
        model_name=args.model,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.force,
        on_rows=None if args.output else lambda rows: _print_rows(rows, args.json),
        data=args.data,
        split=args.split,
        calibration=calibration(args),
    )
    if args.output:
        print(
            f"{summary['rows']} rows in {args.output} ({summary['images']} images predicted "
            f"now, {summary['images_per_s']:.0f} images/s, {args.precision})"
        )
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable file(s)")
    return 0


def run(args: argparse.Namespace) -> int:
    from cait.threads import use_threads

    use_threads(args.threads)
    if args.data is None and not args.images:
        raise ValueError("give image files or folders, or --data SOURCE")
    batched = args.output or args.resume or args.data is not None
    if batched or any(os.path.isdir(i) for i in args.images):
        return _batched(args)
    from cait.inference import predict

    results = predict(
        args.checkpoint,
        args.images,
        topk=args.topk,
        model_name=args.model,
        device=args.device,
        precision=args.precision,
        calibration=calibration(args),
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for p in r["predictions"]:
            print(f"  {p['probability']:7.2%}  {p['name']}")
    return 0
