"""``cait eval``: a checkpoint's top-1, top-5 and loss on a validation split."""

from __future__ import annotations

import argparse
import json
from typing import get_args

from cait.cli._common import (
    CHECKPOINT_HELP,
    MODEL_HELP,
    calibrate_flags,
    calibration,
    crop_ratio,
    positive_int,
    precision_flag,
    threads_flag,
)

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "evaluate checkpoints on a validation split"
EXAMPLES = """
cait eval --checkpoint runs/demo/model.safetensors --data digits
cait eval --checkpoint XXS24_224.pth --model cait_xxs24_224 --data /data/imagenet
cait eval --checkpoint runs/a/best.pt runs/b/best.pt --data digits --precision fp32 int8 \\
    --results-file compare.csv
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.runtime import Amp, Device

    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        action="extend",
        help=CHECKPOINT_HELP + "; several give one row each",
    )
    p.add_argument("--data", required=True, help="an image folder (its val/ is used) or digits")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", choices=get_args(Device), default="auto", help="where to run")
    p.add_argument("--amp", choices=get_args(Amp), default="none", help="mixed precision")
    p.add_argument(
        "--crop-pct",
        type=crop_ratio,
        help="the centre crop's ratio, in [0.25, 1]: the image is resized to img_size / "
        "crop_pct, then centre-cropped (default: the checkpoint's)",
    )
    p.add_argument(
        "--classes-by-position",
        action="store_true",
        help="map the data's classes to the checkpoint's by index even where their names "
        "differ (a warning, not a refusal)",
    )
    precision_flag(
        p,
        nargs="+",
        default=None,
        metavar="PRECISION",
        help="fp32, bf16 (autocast; on a CPU with avx512_bf16 or amx_bf16), int8 (the linear "
        "layers quantized, CPU only); several give one row each (default: fp32, or --amp)",
    )
    calibrate_flags(p)
    p.add_argument(
        "--results-file",
        metavar="FILE",
        help="write one row per checkpoint and precision to FILE (.csv, .jsonl or .parquet): "
        "checkpoint, precision, top1, top5, loss, images, images_per_s, skipped",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (one per line for several)"
    )
    threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from cait.inference import evaluate_checkpoints
    from cait.threads import use_threads

    use_threads(args.threads)
    rows = evaluate_checkpoints(
        args.checkpoint,
        args.data,
        precisions=args.precision or ["fp32"],
        results_file=args.results_file,
        model_name=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        crop_pct=args.crop_pct,
        classes_by_position=args.classes_by_position,
        calibration=calibration(args),
    )
    several = len(rows) > 1
    for r in rows:
        if args.json:
            keys = ("checkpoint", "precision", "top1", "top5", "loss", "images", "images_per_s")
            print(json.dumps({k: r[k] for k in (keys if several else keys[2:6])}))
            continue
        name = f"{r['checkpoint']} {r['precision']}: " if several else ""
        print(
            f"{name}top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
            f"on {r['images']} images  ({r['images_per_s']:.0f} images/s)"
        )
        if r["skipped"]:
            print(f"skipped {r['skipped']} unreadable file(s)")
    if args.results_file:
        print(f"{len(rows)} rows in {args.results_file}")
    return 0
