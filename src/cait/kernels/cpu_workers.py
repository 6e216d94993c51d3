"""A process-wide pool of single-threaded CPU workers for the talking-heads Python path.

Many small memory-bound ops (the chunks of :mod:`cait.kernels.talking_heads`) run faster
as independent tasks on one thread each than split op by op over OpenMP threads: no fork and
join per op, and each worker's data stays in its own core's cache (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

__all__ = ["run_on_cpu_workers"]

T = TypeVar("T")


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

    For many small memory-bound ops this beats splitting every op over OpenMP threads: no
    fork and join per op, and each worker's data stays in its own core's cache
    (docs/BENCHMARKS.md). The tasks run with gradients off, no autocast and the caller's
    inference mode; they must not write the same memory.
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
