"""Top-1 of a checkpoint in fp32 and in bf16 (autocast, what --precision bf16 runs), int8
(what --precision int8 runs) and int8 calibrated (``--precision int8 --calibrate SOURCE``)
on a validation split, and how often each agrees with fp32: the agreement figures of
docs/DEPLOY.md.

    python examples/precision_agreement.py CHECKPOINT DATA [--calibrate SOURCE]

DATA: digits, a folder, ...; SOURCE (default DATA): whose train split calibrates, 256
images as ``--calibrate`` reads them.
"""

from __future__ import annotations

import argparse
import json

import torch

from cait.bench.precision import checkpoint_precision_agreement
from cait.inference import load_for_inference
from cait.inference.calibration import Calibration, calibration_batches
from cait.precision import check_precision


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--calibrate", metavar="SOURCE", help="default: DATA")
    args = p.parse_args()
    loaded = load_for_inference(args.checkpoint)
    calibration = calibration_batches(Calibration(args.calibrate or args.data), loaded)
    results = {}
    for name in ("bf16", "int8", "int8 calibrated"):
        precision = name.split()[0]
        check_precision(precision, torch.device("cpu"))
        r = checkpoint_precision_agreement(
            args.checkpoint,
            args.data,
            precision,
            autocast=precision == "bf16",
            calibration=calibration if name == "int8 calibrated" else None,
        )
        results[name] = {
            "images": r["images"],
            "top1_fp32": round(100 * r["top1_fp32"], 2),
            f"top1_{precision}": round(100 * r[f"top1_{precision}"], 2),
            "agreement": round(100 * r["agreement"], 2),
        }
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, **results}, indent=2))


if __name__ == "__main__":
    main()
