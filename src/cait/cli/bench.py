"""``cait bench``: images/s and peak memory of a variant, optionally beside timm's model or
beside busy processes; with ``--data``, the loader's images/s instead."""

from __future__ import annotations

import argparse
import json
from typing import get_args

from cait.cli._common import positive_int, threads_flag

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "images/s and peak memory, optionally beside timm"
EXAMPLES = """
cait bench --model cait_xxs24_224 --compare timm
cait bench --model cait_s24_224 --device cuda --dtype bf16 --train --compare timm
cait bench --data /data/imagenet --compare timm --workers 4
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.bench import COMPARE_WITH, DTYPES
    from cait.models.config import AttnImpl
    from cait.runtime import DeviceType

    p.add_argument("--model", help="a variant (see cait models); required without --data")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision")
    p.add_argument("--device", choices=get_args(DeviceType), default="cpu", help="where to run")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--train", action="store_true", help="time a full training step")
    p.add_argument("--compare", choices=COMPARE_WITH, help="time timm's model alternately")
    p.add_argument("--compare-dtype", choices=list(DTYPES), help="timm's dtype (default: ours)")
    p.add_argument("--autocast", action="store_true", help="autocast instead of casting")
    p.add_argument(
        "--attn-impl",
        choices=get_args(AttnImpl),
        help="the talking-heads implementation (default: the variant's)",
    )
    p.add_argument("--rounds", type=positive_int, default=5, help="timed rounds (median reported)")
    p.add_argument("--steps", type=positive_int, default=2, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="time it idle, then again beside N busy processes it starts and stops itself",
    )
    threads_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    g = p.add_argument_group("loader throughput (--data)")
    g.add_argument(
        "--data",
        metavar="SOURCE",
        help="time the data loader on this image folder (train/ and val/) instead of a model; "
        "--model then names the input spec (default cait_xxs24_224)",
    )
    g.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    g.add_argument("--batches", type=positive_int, default=8, help="timed batches per round")
    g.add_argument(
        "--pipelines",
        default="synthetic,train,train-today,crop+flip,eval,eval-today",
        help="comma-separated: synthetic, train, train-today, crop+flip, eval, eval-today",
    )
    g.add_argument(
        "--stages",
        type=int,
        metavar="IMAGES",
        help="instead, the CPU time of each step of the training transforms on IMAGES files",
    )


def run(args: argparse.Namespace) -> int:
    from cait.bench import benchmark, benchmark_under_load, format_load_table, format_table
    from cait.threads import use_threads

    if args.data:
        return _run_data(args)
    if not args.model:  # argparse's own line, now that --data makes --model optional
        raise ValueError("the following arguments are required: --model")
    use_threads(args.threads)
    overrides = {"attn_impl": args.attn_impl} if args.attn_impl else {}
    options = dict(
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        compile=args.compile,
        train=args.train,
        compare=args.compare,
        compare_dtype=args.compare_dtype,
        autocast=args.autocast,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        **overrides,
    )
    if args.load:
        loaded = benchmark_under_load(args.model, args.load, **options)
        print(json.dumps(loaded.to_dict(), indent=2) if args.json else format_load_table(loaded))
        return 0
    result = benchmark(args.model, **options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def _run_data(args: argparse.Namespace) -> int:
    """``cait bench --data``: the loader's throughput, or ``--stages`` its steps' CPU time."""
    from cait.bench import competitors
    from cait.bench import loader as bench_loader

    model = args.model or "cait_xxs24_224"
    if args.stages is not None:
        from cait.bench.stages import format_stage_table, stage_breakdown

        stages = stage_breakdown(args.data, model, args.stages, args.rounds, args.batch_size)
        print(json.dumps(stages.to_dict(), indent=2) if args.json else format_stage_table(stages))
        return 0
    options = dict(
        model=model,
        pipelines=[p.strip() for p in args.pipelines.split(",") if p.strip()],
        compare=args.compare,
        workers=args.workers,
        batch_size=args.batch_size,
        batches=args.batches,
        rounds=args.rounds,
    )
    results = [bench_loader.loader_benchmark(args.data, **options)]
    if not args.json:  # the idle table now, not after the loaded rounds
        print(bench_loader.format_loader_table(results[0]), flush=True)
    if args.load:
        with competitors(args.load):
            results.append(
                bench_loader.loader_benchmark(args.data, competitors=args.load, **options)
            )
        if not args.json:
            print("\n" + bench_loader.format_loader_table(results[1]))
    if args.json:
        dicts = [r.to_dict() for r in results]
        print(json.dumps(dicts[0] if len(dicts) == 1 else {"idle": dicts[0], "loaded": dicts[1]}))
    return 0
