"""``cait models``: the variant table."""

from __future__ import annotations

import argparse
import json

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "list the model variants"
EXAMPLES = "cait models 'cait_s*'"


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'cait_s*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from cait.models.registry import variant_rows, variant_table

    if args.json:
        print(json.dumps(variant_rows(args.pattern), indent=2))
    else:
        print(variant_table(args.pattern))
    return 0
