"""The ``cait`` command line: parse, build a config, call one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_models(args: argparse.Namespace) -> int:
    from cait.variants import get_variant, list_models

    rows = []
    for name in list_models(args.pattern):
        v = get_variant(name)
        c = v.config
        rows.append(
            {
                "name": name,
                "img_size": c.img_size,
                "embed_dim": c.embed_dim,
                "depth": c.depth,
                "heads": c.num_heads,
                "init_scale": c.init_scale if c.branch_scale == "layerscale" else None,
                "params_m": v.params_m,
                "top1": v.top1,
                "crop_pct": v.crop_pct,
                "url": v.url,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'name':<24}{'img':>5}{'dim':>5}{'depth':>6}{'heads':>6}"
        f"{'eps':>8}{'params':>9}{'top1':>7}{'crop':>6}"
    )
    for r in rows:
        eps = f"{r['init_scale']:.0e}" if r["init_scale"] is not None else "-"
        params = f"{r['params_m']:.2f}M" if r["params_m"] is not None else "-"
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        print(
            f"{r['name']:<24}{r['img_size']:>5}{r['embed_dim']:>5}{r['depth']:>6}{r['heads']:>6}"
            f"{eps:>8}{params:>9}{top1:>7}{r['crop_pct']:>6}"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from cait.weights import convert_checkpoint

    state_dict = convert_checkpoint(args.src, args.dst, model_name=args.model)
    print(f"wrote {len(state_dict)} tensors to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cait", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model variants")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'cait_s*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("convert", help="convert an official checkpoint to safetensors")
    p.add_argument("src", help="official .pth, plain state dict, URL or Hub id")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", help="variant to validate the weights against (strict load)")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"cait {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
