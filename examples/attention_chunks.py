"""Time the talking-heads attention core alone: the C++ kernel, and the Python path by
chunk size, threads and workers.

    python examples/attention_chunks.py [--threads 1 2] [--workers -1 0 1] [--batch-size 32]
                                        [--repeat 3]

For ``cait_xxs24_224``'s shapes (N = 196 patches, 4 heads, head dim 48) it times the
forward pass (no grad) and forward plus backward of
:func:`cait.kernels.talking_heads.talking_heads_attention`. ``--workers -1`` is the C++ kernel
(the default on the CPU; one image at a time, so no chunks). The others are the Python
path (``use_native=False``) with 1, 2, 4, 8 images per chunk and the whole batch:
``--workers 0`` shares the chunks between as many single-threaded CPU workers as torch has
threads; ``--workers 1`` runs every chunk in the calling thread, each op split over the
OpenMP threads. Each setting runs in a fresh process, ``--repeat`` times: on a shared or
virtual machine the two-thread figures can differ from one process to the next
(docs/BENCHMARKS.md), which a single run would hide. With several workers a chunk size is
capped so that every worker gets a chunk (the whole batch of 32 becomes two chunks of 16).
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
from cait.kernels.talking_heads import talking_heads_attention
batch, threads, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
native = workers == -1
chunks = [None] if native else [1, 2, 4, 8, batch]
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
for images in chunks:
    kw = dict(use_native=True) if native else dict(
        use_native=False, chunk_bytes=images * H * N * N * 4, workers=workers or None)
    def fwd():
        with torch.no_grad():
            talking_heads_attention(qkv, H, *params, hd**-0.5, **kw)
    def fwd_bwd():
        talking_heads_attention(qkv, H, *params, hd**-0.5, **kw).sum().backward()
    row["C++" if native else images] = (ms(fwd), ms(fwd_bwd))
print(json.dumps(row))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[-1, 0, 1],
        help="-1: the C++ kernel; 0: Python, as many workers as threads; 1: Python, per-op",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per thread count")
    args = parser.parse_args()
    print(f"batch {args.batch_size}; ms forward / forward+backward by images per chunk")
    for threads in args.threads:
        for workers in args.workers if threads > 1 else sorted({min(w, 0) for w in args.workers}):
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
                cells = "  ".join(f"{k:>3}: {f:5.1f} / {fb:5.1f}" for k, (f, fb) in row.items())
                label = f"threads {threads} " + (
                    "C++ kernel" if workers == -1 else f"Python, workers {workers or threads}"
                )
                print(f"{time.strftime('%H:%M:%S')} {label} run {r + 1}  {cells}", flush=True)


if __name__ == "__main__":
    main()
