"""``cait explain``: what in an image a prediction rests on (rollout, gradient-weighted
attention, Grad-CAM, the CA maps), and how faithful each method is (deletion and
insertion areas)."""

from __future__ import annotations

import argparse

from cait.cli._common import (
    CHECKPOINT_HELP,
    DATA_HELP,
    MODEL_HELP,
    picture_flags,
    positive_int,
)

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "explain predictions (attention rollout, gradients, Grad-CAM) and score faithfulness"
EXAMPLES = """
cait explain --checkpoint runs/demo/model.safetensors runs/demo/samples/*.png \\
    --output runs/demo/explain
cait explain --checkpoint runs/demo/model.safetensors --faithfulness --data digits \\
    --output runs/demo/faithfulness
"""
METHOD_NAMES = ("rollout", "gradient", "gradcam", "ca")  # cait.analysis.explain.METHODS


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.analysis.faithfulness import DEFAULT_LIMIT, DEFAULT_STEPS

    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to explain")
    p.add_argument(
        "--output",
        help="folder for the pictures and .npy maps (required with images), or for "
        "faithfulness.csv and faithfulness.png",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--method",
        action="append",
        choices=METHOD_NAMES,
        help="a method to draw or score; repeat it for several (default: all of them)",
    )
    p.add_argument(
        "--class",
        dest="target",
        type=int,
        metavar="K",
        help="explain class K, an index from 0 (default: each image's prediction)",
    )
    p.add_argument(
        "--block",
        type=positive_int,
        help="the self-attention block Grad-CAM reads, from 1 (default: the last one)",
    )
    p.add_argument(
        "--faithfulness",
        action="store_true",
        help="score each method's deletion and insertion areas on --data and print the table",
    )
    p.add_argument("--data", metavar="SOURCE", help="'digits' or an image folder (its val/ split)")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_LIMIT,
        help="images scored, spread over the split",
    )
    p.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help="points per curve, at most"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random ordering")
    picture_flags(p)


def _check(args: argparse.Namespace) -> None:
    if args.faithfulness:
        if args.images:
            raise ValueError("--faithfulness scores --data; give no images with it")
        if args.data is None:
            raise ValueError(f"--faithfulness needs --data ({DATA_HELP})")
        if args.target is not None:
            raise ValueError("--faithfulness explains each image's prediction; drop --class")
    else:
        if not args.images:
            raise ValueError("give images to explain, or --faithfulness --data SOURCE")
        if args.output is None:
            raise ValueError("give --output, a folder for the pictures")
        if args.data is not None:
            raise ValueError("--data is for --faithfulness")


def run(args: argparse.Namespace) -> int:
    from cait.analysis.attention import SABlockOutOfRange
    from cait.threads import use_threads

    _check(args)
    use_threads(args.threads)
    methods = args.method or list(METHOD_NAMES)
    block = None if args.block is None else args.block - 1  # the library counts from 0
    try:
        return (
            _faithfulness(args, methods, block)
            if args.faithfulness
            else _pictures(args, methods, block)
        )
    except SABlockOutOfRange as err:  # the library counts blocks from 0, the flag from 1
        raise ValueError(
            f"--block must be in 1..{err.depth} (this model's self-attention blocks), "
            f"got {args.block}"
        ) from None


def _faithfulness(args: argparse.Namespace, methods: list[str], block: int | None) -> int:
    from cait.analysis.faithfulness import format_table, save_faithfulness

    result = save_faithfulness(
        args.checkpoint,
        args.data,
        args.output,
        model_name=args.model,
        methods=methods,
        limit=args.limit,
        steps=args.steps,
        seed=args.seed,
        img_size=args.img_size,
        device=args.device,
        block=block,
        overwrite=args.force,
    )
    print(format_table(result))
    if args.output:
        print(f"table and curves in {args.output}")
    return 0


def _pictures(args: argparse.Namespace, methods: list[str], block: int | None) -> int:
    from cait.analysis.explain import save_explanations

    results = save_explanations(
        args.checkpoint,
        args.images,
        args.output,
        methods,
        target=args.target,
        block=block,
        model_name=args.model,
        img_size=args.img_size,
        device=args.device,
        style=args.style,
        overwrite=args.force,
    )
    for r in results:
        print(f"{r['image']}: class {r['name']} (predicted {r['prediction']}) -> {r['picture']}")
    return 0
