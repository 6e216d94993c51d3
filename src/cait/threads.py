"""How many intra-op threads to run when other work shares the CPU.

torch runs every op as an OpenMP team of ``torch.get_num_threads()`` threads that meet at a
barrier when the op ends. On an idle machine one thread per core is fastest. When another
process keeps a core busy, one of the team's threads is descheduled for a time slice at a
time and every op waits for it at the barrier: on 2 cores with one busy competitor a
``cait_digits_16`` training step ran at 441 img/s with 2 threads against 825 with 1 (idle:
1307 and 848; docs/BENCHMARKS.md, "CPU under load"). Spinning less does not fix it
(``OMP_WAIT_POLICY=PASSIVE`` lost 37% of the idle speed and still lost to one thread under
load), and a thread count fixed at start cannot follow load that comes and goes.

So by default (:class:`ThreadPolicy` with ``threads=None``) the count follows the CPU that
the process can actually get. The most it uses is torch's default, capped by the CPUs the
process may run on (affinity) and its cgroup quota. Every few seconds, between steps, it
measures how much CPU *other* processes used (the machine's busy time from ``/proc/stat``
less this process's own CPU time) and runs as many threads as there are cores left for
it, rounded so that a little background noise does not cost a thread. A count given with
``--threads`` (or ``OMP_NUM_THREADS``, which torch reads) is used as it is.

torch's CPU ops sum in an order that depends on the thread count, so a run whose count
changes is reproducible to about 1e-6, not bitwise; pin ``--threads`` for bitwise
reproducible runs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CpuSample",
    "ThreadPolicy",
    "adapt",
    "allowed_cpus",
    "ensure_policy",
    "read_cpu_sample",
    "use_threads",
]

logger = logging.getLogger(__name__)

# Seconds between two decisions: long enough that a sample averages over many scheduler
# time slices, short enough to follow a competitor that starts or stops within an epoch.
INTERVAL_S = 2.0
# Cores left for us are rounded up from this fraction: 1.75 free cores run 2 threads, 1.7
# run 1. Background noise (a shell, the logger) then costs no thread, while a competitor
# that keeps a core 30% busy already makes the second thread wait at every barrier.
ROUND_UP_FROM = 0.75

_PROC_STAT = Path("/proc/stat")
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")  # cpu.cfs_quota_us and cpu.cfs_period_us


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU time at one moment: the machine's busy time over all its CPUs, this
    process's own, both in CPU-seconds, and the wall clock, in seconds."""

    wall: float
    machine_busy: float
    own: float
    machine_cpus: int


def read_cpu_sample() -> CpuSample | None:
    """The current :class:`CpuSample`, or ``None`` where ``/proc/stat`` cannot be read."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    fields = lines[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
    ticks = [int(v) for v in fields[1:]]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    if len(ticks) > 8:  # guest time is already counted in user and nice
        busy -= sum(ticks[8:10])
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    hz = os.sysconf("SC_CLK_TCK")
    return CpuSample(time.monotonic(), busy / hz, time.process_time(), max(cpus, 1))


def allowed_cpus() -> tuple[float, str]:
    """How many CPUs this process may use, and why: its affinity, capped by its cgroup's
    CPU quota (a container limited to 1.5 CPUs gives 1.5)."""
    try:
        count: float = len(os.sched_getaffinity(0))
        why = f"{int(count)} CPUs in its affinity"
    except AttributeError:  # not on Linux
        count, why = float(os.cpu_count() or 1), f"{os.cpu_count()} CPUs"
    quota = _cgroup_quota()
    if quota is not None and quota < count:
        count, why = quota, f"{why}, cgroup quota {quota:g} CPUs"
    return count, why


def _cgroup_quota() -> float | None:
    try:
        if _CGROUP_V2.is_file():
            quota, period = _CGROUP_V2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file = _CGROUP_V1 / "cpu.cfs_quota_us"
        period_file = _CGROUP_V1 / "cpu.cfs_period_us"
        if quota_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


class ThreadPolicy:
    """The intra-op thread count of this process, adapted to other processes' load.

    ``threads`` pins the count; ``None`` adapts it (pinned anyway when ``OMP_NUM_THREADS``
    is set, as a user of torch would expect), up to ``ceiling`` (default: torch's count
    now). Call :meth:`adapt` between steps: it costs two small file reads every
    :data:`INTERVAL_S` seconds and nothing in between. ``reader`` and ``clock`` are for
    tests.
    """

    def __init__(
        self,
        threads: int | None = None,
        interval: float = INTERVAL_S,
        reader: Callable[[], CpuSample | None] = read_cpu_sample,
        clock: Callable[[], float] = time.monotonic,
        ceiling: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.interval, self._read, self._clock = interval, reader, clock
        self._last: CpuSample | None = None
        env = os.environ.get("OMP_NUM_THREADS")
        if threads is not None:
            self.pinned, self.reason = True, "given"
            torch.set_num_threads(threads)
        elif env:
            self.pinned, self.reason = True, "OMP_NUM_THREADS"
        else:
            self.pinned = False
        if self.pinned:
            self.max_threads = torch.get_num_threads()
            return
        cpus, why = allowed_cpus()
        ceiling = ceiling or torch.get_num_threads()
        self.max_threads = max(1, min(ceiling, math.floor(cpus + 1e-9)))
        self.reason = f"auto, at most {self.max_threads} ({why})"
        torch.set_num_threads(self.max_threads)
        self._last = self._read()
        self._next = self._clock() + self.interval

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.pinned:
            return f"{torch.get_num_threads()} ({self.reason})"
        return f"{torch.get_num_threads()} now ({self.reason}; following other load)"

    def adapt(self) -> int:
        """The thread count to run now, set in torch: unchanged when pinned, between two
        samples, or where ``/proc/stat`` cannot be read."""
        if self.pinned or self.max_threads == 1 or self._clock() < self._next:
            return torch.get_num_threads()
        self._next = self._clock() + self.interval
        sample, last = self._read(), self._last
        self._last = sample
        if sample is None or last is None or sample.wall <= last.wall:
            return torch.get_num_threads()
        wall = sample.wall - last.wall
        others = max(0.0, (sample.machine_busy - last.machine_busy) - (sample.own - last.own))
        free = sample.machine_cpus - others / wall  # cores the others left, on average
        target = max(1, min(self.max_threads, math.floor(free + 1 - ROUND_UP_FROM)))
        current = torch.get_num_threads()
        if target != current:
            logger.debug(
                "threads %d -> %d: other processes kept %.2f of %d CPUs busy over %.1f s",
                current,
                target,
                others / wall,
                sample.machine_cpus,
                wall,
            )
            torch.set_num_threads(target)
        return target


# The process's policy. It is module state because what it governs, torch's intra-op
# thread count, is process state already: the steps that call adapt() (training, evaluation,
# benchmarks) need not be handed it through every signature.
_policy: ThreadPolicy | None = None


def use_threads(threads: int | None = None) -> ThreadPolicy:
    """Set this process's thread policy (see the module docstring) and return it: ``threads``
    pins the count, ``None`` follows the load. :func:`adapt` then applies it."""
    global _policy
    # a new policy after an adapting one keeps its ceiling, not the count it had lowered to
    ceiling = _policy.max_threads if _policy is not None and not _policy.pinned else None
    _policy = ThreadPolicy(threads, ceiling=ceiling)
    logger.info("threads: %s", _policy.describe())
    return _policy


def ensure_policy() -> ThreadPolicy:
    """The process's thread policy, made to follow the load if none was set: entry points
    of the library call this, so that library use behaves as the CLI does. Its ceiling is
    torch's thread count at that moment, so a count set with ``torch.set_num_threads``
    before is never exceeded."""
    return _policy if _policy is not None else use_threads(None)


def adapt() -> int:
    """Apply the process's thread policy between two steps; without one (a library user who
    never called :func:`use_threads`), leave torch's thread count as it is."""
    return _policy.adapt() if _policy is not None else torch.get_num_threads()
