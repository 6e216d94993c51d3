"""``cait bench``: how fast a model runs, alone, beside timm's, or beside other work.

- :mod:`cait.bench.throughput`: images/s and peak memory of a model (``benchmark``);
- :mod:`cait.bench.compare`: timm's model of the same name, checked to agree, to time beside;
- :mod:`cait.bench.load`: the same benchmark idle and beside busy competitor processes;
- :mod:`cait.bench.precision`: fp32 against bf16/fp16 top-1 of a model or checkpoint. Import
  it from there: it needs the data pipeline (and so timm), which this package does not load,
  so that the CLI can read :data:`DTYPES` and :data:`COMPARE_WITH` cheaply.
"""

from cait.bench.compare import COMPARE_WITH, Compare
from cait.bench.load import (
    COMPETITOR_MAX_S,
    LoadResult,
    benchmark_under_load,
    competitors,
    format_load_table,
)
from cait.bench.throughput import DTYPES, BenchResult, ModelTiming, benchmark, format_table

__all__ = [
    "COMPARE_WITH",
    "COMPETITOR_MAX_S",
    "DTYPES",
    "BenchResult",
    "Compare",
    "LoadResult",
    "ModelTiming",
    "benchmark",
    "benchmark_under_load",
    "competitors",
    "format_load_table",
    "format_table",
]
