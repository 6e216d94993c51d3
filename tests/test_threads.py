"""The thread policy: pinned counts, following other processes' load (with a fake
``/proc/stat``), cgroup quotas, and the load benchmark's competitor processes."""

from __future__ import annotations

import pytest
import torch

from cait import threads
from cait.bench import benchmark_under_load, competitors
from cait.cli import main
from cait.threads import CpuSample, ThreadPolicy


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_policy", None)
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """A 2-CPU machine whose other processes use ``others`` cores; this process uses
    ``own`` cores. Time moves only when told."""

    def __init__(self) -> None:
        self.now, self.busy, self.own_time = 0.0, 0.0, 0.0
        self.others, self.own = 0.0, 1.0
        self.readable = True

    def run(self, seconds: float) -> None:
        self.now += seconds
        self.busy += (self.others + self.own) * seconds
        self.own_time += self.own * seconds

    def read(self) -> CpuSample | None:
        if not self.readable:
            return None
        return CpuSample(self.now, self.busy, self.own_time, 2)

    def clock(self) -> float:
        return self.now


def _auto_policy(monkeypatch, machine: FakeMachine) -> ThreadPolicy:
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: (2.0, "2 CPUs in its affinity"))
    return ThreadPolicy(None, interval=2.0, reader=machine.read, clock=machine.clock)


def test_follows_other_processes_load(monkeypatch):
    machine = FakeMachine()
    policy = _auto_policy(monkeypatch, machine)
    assert torch.get_num_threads() == 2 and not policy.pinned
    machine.others = 0.1  # background noise costs no thread
    machine.run(2.0)
    assert policy.adapt() == 2
    machine.others = 0.9  # a competitor keeps a core busy
    machine.run(1.0)
    assert policy.adapt() == 2  # not yet: the interval has not passed
    machine.run(1.0)
    assert policy.adapt() == 1 and torch.get_num_threads() == 1
    machine.others = 1.5  # three competitors: still one thread, never zero
    machine.run(2.0)
    assert policy.adapt() == 1
    machine.others = 0.2  # the competitors are gone
    machine.run(2.0)
    assert policy.adapt() == 2 and torch.get_num_threads() == 2


def test_an_unreadable_proc_stat_changes_nothing(monkeypatch):
    machine = FakeMachine()
    policy = _auto_policy(monkeypatch, machine)
    machine.readable, machine.others = False, 2.0
    machine.run(4.0)
    assert policy.adapt() == 2


@pytest.mark.parametrize("how", ["argument", "OMP_NUM_THREADS"])
def test_a_given_count_is_kept(monkeypatch, how):
    machine = FakeMachine()
    torch.set_num_threads(2)
    if how == "OMP_NUM_THREADS":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        policy = ThreadPolicy(None, reader=machine.read, clock=machine.clock)
        expected, reason = 2, "OMP_NUM_THREADS"
    else:
        policy = ThreadPolicy(1, reader=machine.read, clock=machine.clock)
        expected, reason = 1, "given"
    assert policy.pinned and policy.describe() == f"{expected} ({reason})"
    machine.others = 2.0 if expected == 2 else 0.0  # load that would change an auto count
    machine.run(10.0)
    assert policy.adapt() == expected == torch.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        ThreadPolicy(0)


def test_cgroup_quota_caps_the_threads(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CGROUP_V2", cpu_max)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max.write_text("150000 100000\n")
    assert threads.allowed_cpus() == (1.5, "4 CPUs in its affinity, cgroup quota 1.5 CPUs")
    cpu_max.write_text("max 100000\n")
    assert threads.allowed_cpus() == (4.0, "4 CPUs in its affinity")
    torch.set_num_threads(4)
    cpu_max.write_text("150000 100000\n")
    assert ThreadPolicy(None).max_threads == 1


def test_proc_stat_is_read_as_busy_cpu_seconds(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 1000 30 5 5 10 40 0\ncpu0 1 2 3\ncpu1 1 2 3\nintr 1\n")
    monkeypatch.setattr(threads, "_PROC_STAT", stat)
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    sample = threads.read_cpu_sample()
    assert sample.machine_cpus == 2
    # user, system, irq, softirq, steal; guest time is already inside user
    assert sample.machine_busy == pytest.approx((100 + 50 + 5 + 5 + 10) / 100)
    stat.write_text("garbage")
    assert threads.read_cpu_sample() is None


def test_competitors_run_and_stop():
    with competitors(2) as procs:
        assert all(p.poll() is None for p in procs)  # running
    assert all(p.returncode is not None for p in procs)  # stopped, reaped
    with pytest.raises(ValueError):
        with competitors(-1):
            pass


def test_bench_under_load_reports_both_and_their_ratio(capsys):
    result = benchmark_under_load(
        "cait_digits_16", 1, batch_size=8, train=True, rounds=1, steps=1, warmup=1
    )
    assert result.competitors == 1
    slow = result.slowdowns()["cait"]
    idle, loaded = result.idle.timings[0].images_per_s, result.loaded.timings[0].images_per_s
    assert slow == pytest.approx(idle / loaded)
    argv = ["bench", "--model", "cait_digits_16", "--batch-size", "8", "--rounds", "1"]
    assert main([*argv, "--steps", "1", "--warmup", "1", "--load", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "idle img/s" in out and "loaded img/s" in out and "slowdown" in out
    assert "1 idle, 1 loaded" in out  # pinned by --threads


def test_a_second_policy_keeps_the_first_ones_ceiling(monkeypatch):
    """Two runs in one process (an ablation grid): the second may use every thread again
    even though the first had lowered the count under load."""
    monkeypatch.setattr(threads, "allowed_cpus", lambda: (2.0, "2 CPUs in its affinity"))
    torch.set_num_threads(2)
    first = threads.use_threads(None)
    torch.set_num_threads(1)  # what adapt() does under load
    second = threads.use_threads(None)
    assert first.max_threads == second.max_threads == 2 and torch.get_num_threads() == 2
