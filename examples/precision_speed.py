"""Images/s of cait_xxs24_224 on the CPU in each inference precision, beside timm's model in
fp32, eager and compiled: the figures of docs/DEPLOY.md.

bf16 runs two ways: what ``--precision bf16`` runs on a CPU (autocast over a copy whose
linear layers hold packed bf16 weights, GELU fused: ``cait.precision.bf16``), and plain
autocast over the fp32 model (what it ran before, and what it runs on CUDA). int8 runs
three ways: oneDNN's engine with dynamic activation scales (what ``--precision
int8`` runs), the same with static scales (``--calibrate``; calibrated here on the timed
batch itself: the scales change no timing), and torch.ao's dynamic quantization (the
engine of CPUs without VNNI, and this project's before).

All models run in one process on the same random batch, in alternating rounds whose order
flips every round (cait.bench's protocol); each figure is a median over rounds and each
ratio is to our fp32 model in the same rounds. The load average before and after is printed:
the machine is shared.

    python examples/precision_speed.py [--batch-size 32] [--rounds 6] [--no-compile] [--threads N]

``--threads N`` pins torch's thread count; by default it follows the machine's load as the
CLI does (``cait.threads``), and the count at the end is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

import torch

from cait.bench.compare import build_reference
from cait.bench.throughput import _make_step, _model_and_batch, _timed_rounds
from cait.precision import check_precision, pack_bf16, quantize_int8, quantize_int8_ao
from cait.threads import use_threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cait_xxs24_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="leave timm compiled out")
    p.add_argument("--threads", type=int, help="pin torch's threads (default: follow the load)")
    args = p.parse_args()
    use_threads(args.threads)
    cpu = torch.device("cpu")
    check_precision("bf16", cpu)
    load_before = os.getloadavg()
    ours, images, targets = _model_and_batch(args.model, args.batch_size, 0, {})
    timm_eager = build_reference(args.model, ours.state_dict())

    def step(model: torch.nn.Module, autocast: bool = False) -> Callable[[], None]:
        """One inference step of ``model`` as given; ``autocast`` in bf16."""
        dtype = torch.bfloat16 if autocast else torch.float32
        return _make_step(model, images, targets, False, dtype, autocast, cpu)

    steps = {
        "cait fp32": step(ours),
        "cait bf16": step(pack_bf16(ours), autocast=True),
        "cait bf16 autocast alone": step(ours, autocast=True),
        "cait int8": step(quantize_int8(ours)),
        "cait int8 calibrated": step(quantize_int8(ours, calibration=[images])),
        "cait int8 torch.ao": step(quantize_int8_ao(ours)),
        "timm fp32 eager": step(timm_eager),
    }
    if not args.no_compile:
        timm_compiled = torch.compile(build_reference(args.model, ours.state_dict()))
        steps["timm fp32 compiled"] = step(timm_compiled)
    for fn in steps.values():  # warm-up, compilation included
        fn()
        fn()
    per_round = _timed_rounds(steps, args.rounds, args.steps, args.batch_size, cpu)
    base = per_round["cait fp32"]
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "images_per_s": {k: statistics.median(v) for k, v in per_round.items()},
        "vs_cait_fp32": {
            k: statistics.median(a / b for a, b in zip(v, base, strict=True))
            for k, v in per_round.items()
        },
    }
    for name in ("timm fp32 eager", "timm fp32 compiled"):
        if name in per_round:
            result[f"vs_{name.replace(' ', '_')}"] = {
                k: statistics.median(a / b for a, b in zip(v, per_round[name], strict=True))
                for k, v in per_round.items()
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
