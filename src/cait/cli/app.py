"""``cait app``: a web page showing any image's prediction and attention maps."""

from __future__ import annotations

import argparse

from cait.cli._common import (
    MODEL_HELP,
    precision_flag,
    threads_flag,
)

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "a web page: the prediction and attention maps of any image"
EXAMPLES = "cait app --checkpoint runs/demo/model.safetensors   # then open http://127.0.0.1:7860"


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a checkpoint to serve; repeat it for a model chooser",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link")
    precision_flag(p)
    threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from cait.threads import use_threads

    use_threads(args.threads)
    try:  # gradio is an optional dependency (cait[app])
        from cait.app import launch_app
    except ImportError as err:
        raise ValueError(f"cait app needs `pip install cait[app]` ({err})") from err

    launch_app(
        args.checkpoint,
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        precision=args.precision,
    )
    return 0
