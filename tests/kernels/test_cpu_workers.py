"""The process-wide runtime helpers: CPU workers."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from cait.kernels.cpu_workers import run_on_cpu_workers


def _probe(i: int) -> tuple[int, str, int, bool, bool]:
    torch.ones(1)  # any torch op: the worker's thread settings are in force
    return (
        i,
        threading.current_thread().name,
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )


def test_tasks_run_on_single_threaded_workers_in_order():
    caller_threads = torch.get_num_threads()
    results = run_on_cpu_workers([lambda i=i: _probe(i) for i in range(3)])
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(r[1].startswith("cait-cpu") for r in results)  # not the calling thread
    assert all(r[2] == 1 for r in results)  # one intra-op thread each
    assert not any(r[3] for r in results)  # gradients off
    assert torch.get_num_threads() == caller_threads  # the caller's count is unchanged
    with torch.inference_mode():
        assert all(r[4] for r in run_on_cpu_workers([lambda: _probe(0)] * 2))


def test_a_single_task_runs_in_the_calling_thread():
    (result,) = run_on_cpu_workers([lambda: _probe(0)])
    assert result[1] == threading.current_thread().name


def test_a_failing_task_raises_after_every_task_has_finished():
    done = threading.Event()

    def slow() -> None:
        done.wait(timeout=5)
        done.set()

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_on_cpu_workers([fail, slow])
    assert done.is_set()  # the other task ran to its end before the error came back


def _in_child(queue: multiprocessing.Queue) -> None:
    queue.put([r[0] for r in run_on_cpu_workers([lambda i=i: _probe(i) for i in range(2)])])


def test_a_forked_child_makes_its_own_workers():
    run_on_cpu_workers([lambda: 0, lambda: 1])  # the parent's workers exist before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the child hung on the parent's worker threads"
    assert queue.get(timeout=5) == [0, 1]
