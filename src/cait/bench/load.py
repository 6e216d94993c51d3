"""Throughput beside other work: ``cait bench --load N`` times a model idle, then again
beside ``N`` busy competitor processes that it starts and stops itself, the load of another
job on the machine (what :mod:`cait.threads` adapts to).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from cait.bench.throughput import BenchResult, benchmark

__all__ = [
    "COMPETITOR_MAX_S",
    "LoadResult",
    "benchmark_under_load",
    "competitors",
    "format_load_table",
]

# A competitor keeps one core busy in pure Python (no threads of its own), and gives up on
# its own after this many seconds should this process die without stopping it.
COMPETITOR_MAX_S = 900
_BUSY = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@contextlib.contextmanager
def competitors(
    count: int, max_seconds: float = COMPETITOR_MAX_S
) -> Iterator[list[subprocess.Popen]]:
    """``count`` busy processes, one core's worth of work each, for the ``with`` block:
    the load of another job on the machine. Each stops at the end of the block, or by
    itself after ``max_seconds``."""
    if count < 0:
        raise ValueError(f"the number of competitors must be >= 0, got {count}")
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUSY, str(max_seconds)]) for _ in range(count)
    ]
    try:
        time.sleep(0.5 if count else 0.0)  # running before the first timed step
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@dataclass
class LoadResult:
    """The same benchmark idle and beside ``competitors`` busy processes."""

    competitors: int
    idle: BenchResult
    loaded: BenchResult

    def slowdowns(self) -> dict[str, float]:
        """Idle images/s over loaded images/s, per model (2.0: twice the idle time)."""
        loaded = {t.impl: t.images_per_s for t in self.loaded.timings}
        return {t.impl: t.images_per_s / loaded[t.impl] for t in self.idle.timings}

    def to_dict(self) -> dict:
        return {**asdict(self), "slowdowns": self.slowdowns()}


def benchmark_under_load(model_name: str, load: int, **kwargs: Any) -> LoadResult:
    """:func:`benchmark` idle, then again with ``load`` busy competitor processes that it
    starts and stops itself (:func:`competitors`)."""
    if load < 1:
        raise ValueError(f"load must be at least 1 competitor, got {load}")
    idle = benchmark(model_name, **kwargs)
    with competitors(load):
        loaded = benchmark(model_name, **kwargs)
    return LoadResult(load, idle, loaded)


def format_load_table(result: LoadResult) -> str:
    """What ``cait bench --load N`` prints: images/s idle and loaded, and the slowdown."""
    r = result
    lines = [
        f"{r.idle.model} {r.idle.mode} batch {r.idle.batch_size}: idle and with "
        f"{r.competitors} busy competitor process{'es' if r.competitors > 1 else ''} "
        f"(threads at the end: {r.idle.threads} idle, {r.loaded.threads} loaded; cait.threads)",
        f"{'impl':<6}{'idle img/s':>12}{'loaded img/s':>14}{'slowdown':>10}",
    ]
    loaded = {t.impl: t.images_per_s for t in r.loaded.timings}
    for t in r.idle.timings:
        lines.append(
            f"{t.impl:<6}{t.images_per_s:>12.2f}{loaded[t.impl]:>14.2f}"
            f"{r.slowdowns()[t.impl]:>9.2f}x"
        )
    if r.loaded.ratio is not None:
        lines.append(f"cait / timm: {r.idle.ratio:.2f}x idle, {r.loaded.ratio:.2f}x loaded")
    return "\n".join(lines)
