"""Time the talking-heads attention core alone, by chunk size, threads and workers.

    python examples/attention_chunks.py [--threads 1 2] [--workers 0 1] [--batch-size 32]
                                        [--repeat 3]

For ``cait_xxs24_224``'s shapes (N = 196 patches, 4 heads, head dim 48) it times the
forward pass (no grad) and forward plus backward of
:func:`cait.talking_heads.talking_heads_attention` with 1, 2, 4, 8 images per chunk and
the whole batch. ``--workers 0`` is the default (the chunks shared between as many
single-threaded CPU workers as torch has threads); ``--workers 1`` runs every chunk in the
calling thread, each op split over the OpenMP threads (the code before the workers). Each
setting runs in a fresh process, ``--repeat`` times: on the project's 2-vCPU VM the
two-thread figures differ from one process to the next (docs/BENCHMARKS.md), which a
single run would hide. With several workers a chunk size is capped so that every worker
gets a chunk (the whole batch of 32 becomes two chunks of 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from cait.talking_heads import talking_heads_attention
batch, threads, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) or None
torch.set_num_threads(threads)
torch.manual_seed(0)
N, H, hd = 196, 4, 48
qkv = torch.randn(batch, N, 3 * H * hd, requires_grad=True)
params = [torch.randn(H, H, requires_grad=True), torch.randn(H, requires_grad=True),
          torch.randn(H, H, requires_grad=True), torch.randn(H, requires_grad=True)]

def ms(fn, n=4):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3

row = {}
for images in (1, 2, 4, 8, batch):
    cb = images * H * N * N * 4
    def fwd():
        with torch.no_grad():
            talking_heads_attention(qkv, H, *params, hd**-0.5, chunk_bytes=cb, workers=workers)
    def fwd_bwd():
        out = talking_heads_attention(qkv, H, *params, hd**-0.5, chunk_bytes=cb, workers=workers)
        out.sum().backward()
    row[images] = (ms(fwd), ms(fwd_bwd))
print(json.dumps(row))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1], help="0: the default (threads)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per thread count")
    args = parser.parse_args()
    print(f"batch {args.batch_size}; ms forward / forward+backward by images per chunk")
    for threads in args.threads:
        for workers in args.workers if threads > 1 else [0]:
            for r in range(args.repeat):
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                cmd = [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(args.batch_size),
                    str(threads),
                    str(workers),
                ]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                row = json.loads(out.stdout)
                cells = "  ".join(f"{k:>2}: {f:5.1f} / {fb:5.1f}" for k, (f, fb) in row.items())
                label = f"threads {threads} workers {workers or threads}"
                print(f"{time.strftime('%H:%M:%S')} {label} run {r + 1}  {cells}", flush=True)


if __name__ == "__main__":
    main()
