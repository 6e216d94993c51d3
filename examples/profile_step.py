"""Where one training step of our model spends its time, and how many page faults it makes.

    python examples/profile_step.py [--model cait_xxs24_224] [--batch-size 32] [--workers 1]
        [--top N]

Runs two warm-up steps (forward, cross entropy, backward, AdamW step), counts minor page
faults over three more with ``getrusage``, then profiles one step with ``torch.profiler``
and prints the self CPU time grouped into the categories docs/BENCHMARKS.md discusses.
By default the talking-heads core runs in the C++ kernel, whose ops run on torch's
intra-op threads at once: the profiler records them on each thread, so the times are
summed over threads and the total exceeds the step's wall time. ``--workers N`` runs the
Python path instead (``use_native=False``) with N CPU workers, whose threads the profiler
does not record: the core then shows as one row, the calling thread's time in the custom
autograd function; ``--workers 1`` runs it op by op in the calling thread. CPU figures can
differ from one process to the next, on a shared or virtual machine above all
(docs/BENCHMARKS.md): run it more than once.
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import profile

import cait
import cait.kernels.talking_heads
import cait.models.layers


def category(name: str, shapes: list) -> str:
    if "TalkingHeads" in name:  # the custom autograd function, forward and backward
        # with --workers N > 1 this is the wait for the workers, who do the core's work
        return "talking-heads autograd function, own time"
    # the first matrix operand (addmm's first input is the bias)
    first = (shapes[1] if name == "aten::addmm" else shapes[0]) if shapes else []
    if name in ("aten::addmm", "aten::mm") and len(first) == 2 and min(first) >= 64:
        return "Linear GEMMs (shared with timm)"
    if name == "aten::mm":
        return "head mixing and its (H, H) gradients"
    if name == "aten::bmm":
        return "attention batched products"
    if "gelu" in name:
        return "GELU forward and backward"
    if "softmax" in name:
        return "softmax forward and backward"
    if "layer_norm" in name:
        return "LayerNorm forward and backward"
    if name == "aten::copy_":
        return "copies (mostly Linear bias copies)"
    return "everything else"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cait_xxs24_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, help="the Python talking-heads path, with this many CPU workers"
    )
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest ops")
    args = parser.parse_args()
    if args.workers is not None:
        python_path = functools.partial(
            cait.kernels.talking_heads.talking_heads_attention,
            workers=args.workers,
            use_native=False,
        )
        cait.models.layers.talking_heads_attention = python_path
    torch.manual_seed(0)
    model = cait.create_model(args.model).train()
    size = model.config.img_size
    images = torch.randn(args.batch_size, 3, size, size)
    labels = torch.randint(0, model.config.num_classes, (args.batch_size,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(), step()
    faults, times = [], []
    for _ in range(3):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"step times (s): {', '.join(f'{t:.2f}' for t in times)}; minor page faults: {faults}")
    with profile(record_shapes=True) as prof:
        step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        totals[category(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e3
    print(f"profiled step, self CPU time by category (total {sum(totals.values()):.0f} ms):")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:7.0f} ms  {name}")
    if args.top:
        print(f"the {args.top} costliest ops by self CPU time:")
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        for event in events[: args.top]:
            ms = event.self_cpu_time_total / 1e3
            print(f"  {ms:7.0f} ms  {event.count:5d} calls  {event.key}")


if __name__ == "__main__":
    main()
