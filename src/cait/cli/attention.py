"""``cait attention``: class-attention (and optionally self-attention) maps drawn over
images."""

from __future__ import annotations

import argparse

from cait.cli._common import (
    CHECKPOINT_HELP,
    MODEL_HELP,
    picture_flags,
    positive_int,
)

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "class-attention maps of images, drawn over them"
EXAMPLES = """
cait attention --checkpoint runs/demo/model.safetensors runs/demo/samples/*.png \\
    --output runs/demo/attention --sa-block 2
"""


def add_flags(p: argparse.ArgumentParser) -> None:

    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--output", required=True, help="folder for the PNG grids and .npy maps")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--sa-block",
        type=positive_int,
        help="also draw self-attention block N, counted from 1 as in the pictures and the "
        "paper (default: class attention only)",
    )
    picture_flags(p)


def run(args: argparse.Namespace) -> int:
    from cait.analysis.attention import SABlockOutOfRange, save_attention_maps
    from cait.threads import use_threads

    use_threads(args.threads)
    try:
        results = save_attention_maps(
            args.checkpoint,
            args.images,
            args.output,
            model_name=args.model,
            sa_block=None if args.sa_block is None else args.sa_block - 1,  # an index from 0
            img_size=args.img_size,
            device=args.device,
            style=args.style,
            overwrite=args.force,
        )
    except SABlockOutOfRange as err:  # the library counts blocks from 0, the flag from 1
        raise ValueError(
            f"--sa-block must be in 1..{err.depth} (this model's self-attention blocks), "
            f"got {args.sa_block}"
        ) from None
    for r in results:
        written = [r[k] for k in ("class_attention_png", "self_attention_png") if k in r]
        print(f"{r['image']}: predicted {r['name']} -> {', '.join(written)}")
    return 0
