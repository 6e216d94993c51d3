"""Process-wide settings in one place: seeds, threads, device, precision and the
distributed process group (from the environment ``torchrun`` sets). Logged at start."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import random
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from cait.native import available as native_available

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "autocast",
    "dist_info",
    "distributed",
    "get_rng_state",
    "init_distributed",
    "resolve_device",
    "run_on_cpu_workers",
    "seed_everything",
    "set_rng_state",
    "setup",
    "shutdown_distributed",
    "torchrun_command",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def inference_device(device: str, amp: str) -> torch.device:
    """The device for evaluation or prediction, checking the AMP mode (no reseeding)."""
    dev = resolve_device(device)
    if amp == "fp16" and dev.type != "cuda":
        raise ValueError("amp 'fp16' needs a CUDA device (use 'bf16' on the CPU)")
    return dev


def setup(
    seed: int, device: str, amp: str, threads: int | None = None, local_rank: int = 0
) -> torch.device:
    """Seed every RNG, set threads and matmul precision, check the AMP mode; log it all.

    Under ``torchrun`` a CUDA process takes the GPU of its ``local_rank``.
    """
    dev = inference_device(device, amp)
    if dev.type == "cuda" and dist_info().world_size > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if threads is not None:
        torch.set_num_threads(threads)
    # full fp32 matmuls unless AMP is asked for: results must not depend on TF32 defaults
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed_everything(seed)
    logger.info(
        "runtime: python %s, torch %s, device %s, amp %s, threads %d, seed %d, TF32 off%s",
        platform.python_version(),
        torch.__version__,
        dev,
        amp,
        torch.get_num_threads(),
        seed,
        f", talking heads in {'C++' if native_available() else 'Python'}"
        if dev.type == "cpu"
        else "",
    )
    return dev


def autocast(device: torch.device, amp: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "none")


def get_rng_state() -> dict:
    """Every RNG's state as tensors and plain containers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: one process is rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """The initialised process group's rank and size (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str, timeout_s: float) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): NCCL for CUDA, gloo on the CPU. Without
    ``WORLD_SIZE > 1`` nothing happens. ``timeout_s`` bounds every collective, so a rank that
    waits for a dead peer fails instead of hanging. Ranks other than 0 log warnings only.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = dist_info()
    if not info.is_main:
        logging.getLogger("cait").setLevel(logging.WARNING)
    logger.info(
        "distributed: %d processes, backend %s, collective timeout %.0f s",
        info.world_size,
        dist.get_backend(),
        timeout_s,
    )
    return info


@contextlib.contextmanager
def distributed(device: str, timeout_s: float) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the length of a ``with`` block; the process group is
    destroyed at the end only if this block created it."""
    joins = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    info = init_distributed(device, timeout_s)
    try:
        yield info
    except BaseException:
        if joins:  # no barrier: the peers may never arrive; torchrun stops them
            shutdown_distributed()
        raise
    if joins:
        # gloo torn down while a peer still talks to it aborts that peer now and then
        # ("terminate called without an active exception"): leave together
        dist.barrier()
        shutdown_distributed()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op on one process); returns it."""
    if dist_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over all ranks, in place; returns it."""
    if dist_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process."""
    info = dist_info()
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def torchrun_command(nproc: int, module_args: Sequence[str]) -> list[str]:
    """The single-machine ``torchrun`` command that runs ``python -m cait ARGS`` on
    ``nproc`` processes (``--standalone``: a local rendezvous on a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cait",
        *module_args,
    ]


class _CpuWorkers:
    """``n`` worker threads, made once per process and size (a forked child makes its own:
    threads do not survive ``fork``). Each sets its own OpenMP and MKL thread counts to 1
    and, when there are at least ``n`` CPUs to run on, binds itself to a CPU of its own."""

    def __init__(self, n: int) -> None:
        self.pid, self.size = os.getpid(), n
        self.executor = ThreadPoolExecutor(n, thread_name_prefix="cait-cpu")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        started = threading.Barrier(n, timeout=60)  # n tasks at once: one per worker thread

        def start(i: int) -> None:
            torch.set_num_threads(1)
            if len(cpus) >= n:
                os.sched_setaffinity(0, {cpus[i]})  # 0: this thread
            started.wait()

        for future in [self.executor.submit(start, i) for i in range(n)]:
            future.result()


_workers: _CpuWorkers | None = None
_workers_lock = threading.Lock()


def run_on_cpu_workers(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Run independent CPU tasks at once, each on a worker thread with one intra-op thread;
    their results in order. One task runs in the calling thread, with its thread count.

    For many small memory-bound ops (the chunks of :mod:`cait.talking_heads`) this beats
    splitting every op over OpenMP threads: no fork and join per op, and each worker's
    data stays in its own core's cache (docs/BENCHMARKS.md). The tasks run with gradients
    off, no autocast and the caller's inference mode; they must not write the same memory.
    torch's intra-op thread count is process-wide, so it is 1 until the tasks are done:
    torch ops in other threads of the process run on one thread meanwhile, and callers in
    several threads take turns.
    """
    global _workers
    if len(tasks) == 1:
        return [tasks[0]()]
    inference = torch.is_inference_mode_enabled()

    def run(task: Callable[[], T]) -> T:
        with torch.inference_mode(inference), torch.no_grad():
            with torch.autocast("cpu", enabled=False):
                return task()

    # one caller at a time: the workers and torch's thread count are shared by the process
    with _workers_lock:
        if _workers is None or _workers.pid != os.getpid() or _workers.size != len(tasks):
            if _workers is not None and _workers.pid == os.getpid():
                _workers.executor.shutdown(wait=False)
            _workers = _CpuWorkers(len(tasks))
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            futures = [_workers.executor.submit(run, task) for task in tasks]
            wait(futures)  # all of them, even when one fails: they write into shared outputs
        finally:
            torch.set_num_threads(caller_threads)
    return [f.result() for f in futures]
