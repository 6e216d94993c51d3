"""``cait shards``: write any source's splits as tar shards (``--data shards:OUT``)."""

from __future__ import annotations

import argparse

from cait.cli._common import DATA_HELP, force_flag, positive_int

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "write a dataset's splits as tar shards, for --data shards:OUT"
EXAMPLES = """
cait shards /data/imagenet /data/imagenet-shards --shard-size 1000
cait shards digits runs/digits-shards
cait eval --checkpoint runs/demo/model.safetensors --data shards:runs/digits-shards
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help=f"the source: {DATA_HELP}")
    p.add_argument("out", help="the shard folder to write (tar files and index.json)")
    p.add_argument(
        "--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)"
    )
    force_flag(p, "an existing OUT shard folder (one with index.json; never another folder)")


def run(args: argparse.Namespace) -> int:
    from cait.data.sources import open_source
    from cait.data.sources.shard_writer import SKIPPED_LIST, write_shards

    written = write_shards(open_source(args.src), args.out, args.shard_size, args.force)
    for split, count in written.samples.items():
        print(f"{split}: {count} samples in {written.shards[split]} shards")
    print(f"{len(written.classes)} classes; wrote {written.output}")
    if written.skipped:
        listed = written.output / SKIPPED_LIST
        print(f"skipped {len(written.skipped)} unreadable file(s): see {listed}")
    return 0
