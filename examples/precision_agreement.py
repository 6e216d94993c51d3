"""Top-1 of a checkpoint in fp32 and in bf16 (autocast, what --precision bf16 runs) and int8
(what --precision int8 runs) on a validation split, and how often each agrees with fp32:
the agreement figures of docs/DEPLOY.md.

    python examples/precision_agreement.py CHECKPOINT DATA   # DATA: digits, a folder, ...
"""

from __future__ import annotations

import argparse
import json

import torch

from cait.bench.precision import checkpoint_precision_agreement
from cait.precision import check_precision


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("data")
    args = p.parse_args()
    results = {}
    for precision in ("bf16", "int8"):
        check_precision(precision, torch.device("cpu"))
        r = checkpoint_precision_agreement(
            args.checkpoint, args.data, precision, autocast=precision == "bf16"
        )
        results[precision] = {
            "images": r["images"],
            "top1_fp32": round(100 * r["top1_fp32"], 2),
            f"top1_{precision}": round(100 * r[f"top1_{precision}"], 2),
            "agreement": round(100 * r["agreement"], 2),
        }
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, **results}, indent=2))


if __name__ == "__main__":
    main()
