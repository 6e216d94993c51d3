"""``cait convert``: official weights to a safetensors file."""

from __future__ import annotations

import argparse

from cait.cli._common import force_flag

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "convert an official checkpoint to safetensors"
EXAMPLES = "cait convert XXS24_224.pth xxs24.safetensors --model cait_xxs24_224"


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official .pth, plain state dict, http(s) URL or hf-hub:OWNER/NAME")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument("--model", help="a variant to check the weights against (strict load)")
    force_flag(p, "an existing DST .safetensors file (never a folder or another kind of file)")


def run(args: argparse.Namespace) -> int:
    from cait.models.build import convert_checkpoint

    state_dict = convert_checkpoint(args.src, args.dst, model_name=args.model, overwrite=args.force)
    print(f"wrote {len(state_dict)} tensors to {args.dst}")
    return 0
