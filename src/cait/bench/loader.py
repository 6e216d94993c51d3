"""Loader throughput (``cait bench --data``): images/s, and images/s per worker process, of
the training and evaluation transforms through a torch ``DataLoader`` over the source's own
split (read as training reads it), beside timm's loader on the same files, and a synthetic
source (no decode) as the ceiling; rounds alternate in one process (:mod:`cait.bench.stages`
times each step of a transform on one thread).

This module loads timm (through :mod:`cait.data.transforms`): import it from here, not from
:mod:`cait.bench`.
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cait.data import (
    AugmentConfig,
    build_datasets,
    collate_samples,
    make_loader,
    open_source,
)
from cait.data.decode import DeviceAugment
from cait.data.sources import is_streamed
from cait.data.sources.folder import FolderSource
from cait.data.transforms import (
    device_augment,
    eval_transform,
    fast_eval_transform,
    fast_train_transform,
    timm_loader,
    train_transform,
)
from cait.models.registry import InputSpec, get_variant

__all__ = [
    "PIPELINES",
    "LoaderResult",
    "LoaderTiming",
    "format_loader_table",
    "loader_benchmark",
]

# What each row of the table times ("cait" rows are ours, "timm" rows timm's loader):
# - synthetic: a uint8 tensor per sample, no file and no decode (the DataLoader's ceiling);
# - train: the recipe's training transform (crop, flip, RandAugment, normalise, erasing);
# - train-today: the same with today's transform (float tensors out of the workers);
# - crop+flip: random-resized crop and flip alone;
# - eval: resize and centre crop, uint8 out and normalised batched;
# - eval-today: the same with today's transform (float tensors out of the workers).
PIPELINES = ("synthetic", "train", "train-today", "crop+flip", "eval", "eval-today")
SYNTHETIC_SAMPLES = 4096  # the synthetic source's length (its images are all alike)


class _Synthetic(Dataset):
    """A fixed uint8 image per sample: what the loader costs without a file."""

    def __init__(self, size: int, length: int) -> None:
        self.image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        return self.image.clone(), 0, ()


@dataclass
class LoaderTiming:
    """One loader's rounds: images/s by the wall clock, and images per CPU second of its
    processes (this one and its workers; ``None`` where ``/proc`` cannot be read)."""

    pipeline: str
    impl: str
    workers: int
    rounds: list[float] = field(default_factory=list)
    cpu_rounds: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.rounds)

    @property
    def per_worker(self) -> float:
        """Images/s per worker process (per process with no workers)."""
        return self.images_per_s / max(self.workers, 1)

    @property
    def per_cpu_s(self) -> float | None:
        """Images per CPU second: per core busy on it, whatever else the machine runs."""
        return statistics.median(self.cpu_rounds) if self.cpu_rounds else None

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "images_per_s": self.images_per_s,
            "per_worker": self.per_worker,
            "per_cpu_s": self.per_cpu_s,
        }


@dataclass
class LoaderResult:
    """What ``cait bench --data`` reports."""

    data: str
    model: str
    workers: int
    batch_size: int
    images_per_round: int
    competitors: int
    load_average: list[float] = field(default_factory=list)
    timings: list[LoaderTiming] = field(default_factory=list)

    def ratios(self, per: str = "images_per_s") -> dict[str, float]:
        """Ours over timm's, per pipeline timed both ways, of ``images_per_s`` (wall
        clock) or ``per_cpu_s`` (CPU time)."""
        by = {(t.pipeline, t.impl): getattr(t, per) for t in self.timings}
        return {
            p: by[p, "cait"] / by[p, "timm"]
            for p, impl in by
            if impl == "timm" and by.get((p, "cait")) and by[p, impl]
        }

    def source_ratios(self, per: str = "per_cpu_s") -> dict[str, float]:
        """Each other source's figure over ``data``'s, per pipeline (``"shards train"``)."""
        by = {(t.pipeline, t.impl): getattr(t, per) for t in self.timings}
        return {
            f"{impl} {p}": by[p, impl] / by[p, "cait"]
            for p, impl in by
            if impl not in ("cait", "timm", "synthetic") and by.get((p, "cait")) and by[p, impl]
        }

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "timings"}
        return {
            **out,
            "timings": [t.to_dict() for t in self.timings],
            "ratios": self.ratios(),
            "cpu_ratios": self.ratios("per_cpu_s"),
            "source_ratios": self.source_ratios("images_per_s"),
            "source_cpu_ratios": self.source_ratios(),
        }


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def _with_transform(split: Any, transform: Callable) -> Dataset:
    """``split`` read through ``transform``, as training reads it (a transform that decodes
    itself, the fast training path's, is given the files opened, not decoded)."""
    clone = copy.copy(split)
    clone.transform = transform
    return clone


def _loader(dataset: Dataset, train: bool, workers: int, batch_size: int) -> DataLoader:
    """A loader whose workers live from round to round (so their CPU time can be read):
    shuffled batches for training, in order for evaluation; a streamed split's own plan."""
    if is_streamed(dataset):
        stream = make_loader(dataset, batch_size, train=train, workers=workers).loader.dataset
        return DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        num_workers=workers,
        collate_fn=collate_samples,
        persistent_workers=workers > 0,
        drop_last=True,
    )


def _loaders(
    data: str,
    spec: InputSpec,
    augment: AugmentConfig,
    pipelines: Sequence[str],
    compare: str | None,
    workers: int,
    batch_size: int,
) -> dict[tuple[str, str], tuple[DataLoader, Callable | None]]:
    """Each timed loader by (pipeline, impl), with the batch step the main process runs
    (normalise and erase for uint8 batches; timm's prefetcher does its own)."""
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline {unknown[0]!r}: expected one of {', '.join(PIPELINES)}")
    folder = isinstance(open_source(data), FolderSource)
    if compare == "timm" and not folder:
        raise ValueError(f"--compare timm reads a folder (timm's own reader), not {data}")
    train, val, _ = build_datasets(data, None, None)
    normalise = DeviceAugment(spec.mean, spec.std)
    made: dict[tuple[str, str], tuple[DataLoader, Callable | None]] = {}
    for name in pipelines:
        if name == "synthetic":
            dataset, step = _Synthetic(spec.img_size, SYNTHETIC_SAMPLES), normalise
        elif name == "train":
            dataset = _with_transform(train, fast_train_transform(spec, augment))
            step = device_augment(spec, augment)
        elif name == "train-today":
            dataset, step = _with_transform(train, train_transform(spec, augment)), None
        elif name == "crop+flip":
            crop_flip = fast_train_transform(spec, augment, randaugment=False)
            dataset, step = _with_transform(train, crop_flip), normalise
        elif name == "eval":
            dataset, step = _with_transform(val, fast_eval_transform(spec)), normalise
        else:  # eval-today
            dataset, step = _with_transform(val, eval_transform(spec)), None
        impl = "synthetic" if name == "synthetic" else "cait"
        training = not name.startswith("eval")
        made[name, impl] = (_loader(dataset, training, workers, batch_size), step)
        if compare == "timm" and name in ("train", "crop+flip", "eval"):
            root = Path(data).expanduser() / ("val" if name == "eval" else "train")
            loader = timm_loader(
                root, spec, augment, name != "eval", batch_size, workers, name == "train"
            )
            made[name, "timm"] = (loader, None)
    return made


def _children() -> set[int]:
    """The ids of this process's children (Linux ``/proc``; empty elsewhere)."""
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if fields[1] == me:
            found.add(int(entry.parent.name))
    return found


def _cpu_seconds(pids: set[int]) -> float | None:
    """CPU seconds used so far by this process and ``pids`` (``None`` without ``/proc``)."""
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _time_round(
    batches: Iterator, step: Callable | None, count: int, pids: set[int] | None = None
) -> tuple[float, float | None]:
    """Images/s over ``count`` batches (each through the main process's ``step``), and
    images per CPU second of this process and ``pids``."""
    images = 0
    cpu = _cpu_seconds(pids) if pids is not None else None
    start = time.perf_counter()
    for _ in range(count):
        x = next(batches)[0]
        if step is not None:
            x = step(x)
        images += x.shape[0]
    wall = time.perf_counter() - start
    cpu_end = _cpu_seconds(pids) if cpu is not None else None
    per_cpu = images / (cpu_end - cpu) if cpu_end is not None and cpu_end > cpu else None
    return images / wall, per_cpu


def loader_benchmark(
    data: str,
    model: str = "cait_xxs24_224",
    pipelines: Sequence[str] = PIPELINES,
    compare: str | None = None,
    workers: int = 1,
    batch_size: int = 32,
    batches: int = 8,
    rounds: int = 3,
    competitors: int = 0,
    seed: int = 0,
    beside: Sequence[str] = (),
) -> LoaderResult:
    """Images/s of each loader over ``batches`` batches per round, the loaders taking turns
    round by round (the order rotating) so that the machine's load falls on all of them.
    Each round first draws ``2 * workers + 1`` untimed batches, which empties the batches
    the workers had ready. ``model`` gives the input spec; the recipe's augmentation.
    ``competitors`` only labels the result (:func:`cait.bench.competitors` starts them).
    ``beside``: other sources (the same images as ``data``, say as shards) timed in the
    same rounds through the same pipelines, labelled by their prefix."""
    if workers < 0 or batch_size < 1 or batches < 1 or rounds < 1:
        raise ValueError("workers must be >= 0, and batch size, batches and rounds >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the batch step on one thread, as each worker runs
    try:
        return _alternate(
            data,
            model,
            pipelines,
            compare,
            workers,
            batch_size,
            batches,
            rounds,
            competitors,
            seed,
            beside,
        )
    finally:
        torch.set_num_threads(threads)


def _alternate(
    data: str,
    model: str,
    pipelines: Sequence[str],
    compare: str | None,
    workers: int,
    batch_size: int,
    batches: int,
    rounds: int,
    competitors: int,
    seed: int,
    beside: Sequence[str] = (),
) -> LoaderResult:
    """:func:`loader_benchmark`'s rounds."""
    random.seed(seed)
    torch.manual_seed(seed)
    spec = get_variant(model).input_spec
    made = _loaders(data, spec, AugmentConfig(), pipelines, compare, workers, batch_size)
    others = [p for p in pipelines if p != "synthetic"]
    for other in beside:
        label = open_source(other).prefix or "folder"
        for (name, _), timed in _loaders(
            other, spec, AugmentConfig(), others, None, workers, batch_size
        ).items():
            made[name, label] = timed
    result = LoaderResult(data, model, workers, batch_size, batch_size * batches, competitors)
    result.load_average.append(os.getloadavg()[0])
    iterators, pids = {}, {}
    for key, (loader, _) in made.items():  # start each loader's workers, and note them
        before = _children()
        iterators[key] = _forever(loader)
        next(iterators[key])
        pids[key] = _children() - before
    timings = {key: LoaderTiming(key[0], key[1], workers) for key in made}
    keys = list(made)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            step = made[key][1]
            _time_round(iterators[key], step, 2 * workers + 1)
            per_s, per_cpu = _time_round(iterators[key], step, batches, pids[key])
            timings[key].rounds.append(per_s)
            if per_cpu is not None:
                timings[key].cpu_rounds.append(per_cpu)
    result.load_average.append(os.getloadavg()[0])
    result.timings = list(timings.values())
    return result


def format_loader_table(result: LoaderResult) -> str:
    """What ``cait bench --data`` prints."""
    r = result
    lines = [
        f"{r.data}: {r.model} input, batch {r.batch_size}, {r.workers} worker(s), "
        f"{r.images_per_round} images a round, {len(r.timings[0].rounds)} rounds alternating, "
        f"{r.competitors} busy competitor(s), load average "
        + " -> ".join(f"{x:.2f}" for x in r.load_average),
        f"{'pipeline':<13}{'impl':<11}{'img/s':>9}{'img/s/worker':>14}{'img/CPU-s':>11}  rounds",
    ]
    for t in r.timings:
        rounds = " ".join(f"{x:.0f}" for x in t.rounds)
        cpu = f"{t.per_cpu_s:>11.1f}" if t.per_cpu_s else f"{'-':>11}"
        lines.append(
            f"{t.pipeline:<13}{t.impl:<11}{t.images_per_s:>9.1f}{t.per_worker:>14.1f}{cpu}  "
            f"{rounds}"
        )
    cpu_ratios = r.ratios("per_cpu_s")
    for pipeline, ratio in r.ratios().items():
        by_cpu = f", {cpu_ratios[pipeline]:.2f}x per CPU second" if pipeline in cpu_ratios else ""
        lines.append(f"{pipeline}: cait / timm {ratio:.2f}x images/s{by_cpu}")
    source_cpu = r.source_ratios()
    for which, ratio in r.source_ratios("images_per_s").items():
        by_cpu = f", {source_cpu[which]:.2f}x per CPU second" if which in source_cpu else ""
        lines.append(f"{which}: / {r.data} {ratio:.2f}x images/s{by_cpu}")
    return "\n".join(lines)
