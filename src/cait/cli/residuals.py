"""``cait residuals``: how much each block's residual branches add to the stream."""

from __future__ import annotations

import argparse
from typing import get_args

from cait.cli._common import DATA_HELP, MODEL_HELP, force_flag, positive_int, threads_flag

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "how much each block's residual branches add to the stream (norm ratios)"
EXAMPLES = """
cait residuals --checkpoint runs/a/model.safetensors runs/b/model.safetensors \\
    --label layerscale rezero --data digits --output runs/residuals
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.runtime import DeviceType

    p.add_argument(
        "--checkpoint", required=True, nargs="+", help="one or more checkpoints to compare"
    )
    p.add_argument("--label", nargs="+", help="a name per checkpoint (default: their paths)")
    p.add_argument("--data", required=True, help=f"{DATA_HELP} (its validation split)")
    p.add_argument("--output", required=True, help="folder for residuals.csv and .png")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--num-images", type=positive_int, default=256, help="validation images to average"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--device", choices=get_args(DeviceType), default="cpu", help="where to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    force_flag(p, "the earlier outputs in --output (never a folder holding other files)")
    threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from cait.analysis.residuals import save_residual_report
    from cait.threads import use_threads

    use_threads(args.threads)
    results = save_residual_report(
        args.checkpoint,
        args.data,
        args.output,
        labels=args.label,
        model_name=args.model,
        num_images=args.num_images,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.force,
    )
    for r in results:
        print(
            f"{r.label}: {len(r.attn)} blocks on {r.images} images, attention ratio "
            f"{min(r.attn):.3g}..{max(r.attn):.3g}, MLP ratio {min(r.mlp):.3g}..{max(r.mlp):.3g}"
        )
    print(f"wrote {args.output}/residuals.csv and {args.output}/residuals.png")
    return 0
