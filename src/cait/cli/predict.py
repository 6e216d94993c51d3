"""``cait predict``: the top classes of image files."""

from __future__ import annotations

import argparse
import json
from typing import get_args

from cait.cli._common import CHECKPOINT_HELP, MODEL_HELP, positive_int, threads_flag

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "the top classes of image files"
EXAMPLES = "cait predict --checkpoint runs/demo/model.safetensors runs/demo/samples/*.png"


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.runtime import Device

    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--device", choices=get_args(Device), default="auto", help="where to run")
    p.add_argument("--json", action="store_true", help="print JSON")
    threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from cait.inference import predict
    from cait.threads import use_threads

    use_threads(args.threads)
    results = predict(
        args.checkpoint, args.images, topk=args.topk, model_name=args.model, device=args.device
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for p in r["predictions"]:
            print(f"  {p['probability']:7.2%}  {p['name']}")
    return 0
