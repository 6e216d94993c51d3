"""``shards:DIR``: tar shards in the WebDataset layout, streamed shard by shard.

Each sample is two members with one name: ``NAME.jpg`` (or ``.png``, ``.webp``, ...) and
``NAME.cls`` (the label, an integer in text). ``DIR/index.json`` lists the classes and each
split's shards with their sample counts (``cait shards`` writes it):
``{"classes": [...], "splits": {"train": [{"file": "train-000000.tar", "samples": 1000},
...], "val": [...]}}``. The tar files are read with Python's ``tarfile``, not the
``webdataset`` library: one reader that knows every member's place can skip without
decoding, plan each loader worker's part and name what it could not read.

**An epoch's plan** depends only on ``(seed, epoch)``: the shards in a shuffled order, their
samples one after another; rank ``r`` of ``R`` takes the ``r``-th of ``R`` equal contiguous
parts (the last ``N mod R`` samples are left out, as a sampler leaves them); within each
shard its samples are shuffled; the part is cut into batches (training drops the last
partial one, as a map-style loader does), and batch ``j`` goes to loader worker ``j mod
W``. So every sample is read once per epoch by one worker of one rank, batches come out of
the loader in plan order, and the batches do not depend on the number of workers.
Evaluation takes the shards in order, parts differing by at most one sample, nothing left
out. Repeated augmentation (``repeats`` > 1) repeats each sample in place and keeps the
part's length, as :class:`cait.data.samplers.RepeatedAugSampler` does.

**Bad input**: a shard listed but missing, or an index that does not parse, is a one-line
error before anything is read; a member that is not an image, a label that is not a class
index, or samples lost to a truncated shard are named skips (in training replaced by
another sample of the same shard, so batches keep their size; in evaluation left out).

**Exact resume**: a checkpoint within an epoch records the batches drawn; the resumed loader
draws them again (decoding them, with the same worker seeds) and discards them, as for any
source (:class:`cait.training.engine.EpochPosition`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cait.data.images import IMAGE_EXTENSIONS, MAX_FILE_BYTES
from cait.data.sources.base import (
    SPLITS,
    KeyedSample,
    Source,
    SplitName,
    class_mapping,
    read_sample,
)

__all__ = [
    "INDEX",
    "ShardInfo",
    "ShardSource",
    "ShardStream",
    "member_name",
    "read_index",
    "read_shard",
    "scan_shards",
]

logger = logging.getLogger(__name__)

INDEX = "index.json"
LABEL_EXTENSION = "cls"
SHARD_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
MAX_INDEX_BYTES = 64 << 20  # an index names shards and classes: 64 MiB is a lot of them
# the most classes a folder of shards without an index may have (labels are counted up to it)
MAX_SCANNED_CLASSES = 1_000_000
_SEED_STRIDE = 1_000_003  # (seed, epoch) -> one stream each (as the samplers' stride)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int


def member_name(key: str, extension: str) -> str:
    return f"{key}.{extension}"


def _checked_shard(entry: Any, root: Path, where: str) -> ShardInfo:
    if not isinstance(entry, dict) or set(entry) != {"file", "samples"}:
        raise ValueError(f"{where}: each shard is {{'file': NAME, 'samples': COUNT}}")
    name, count = entry["file"], entry["samples"]
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"{where}: shard file {name!r} is not a plain file name in {root}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{where}: shard {name} has sample count {count!r}")
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in {root / INDEX} but missing")
    return ShardInfo(path, count)


def read_index(root: str | Path) -> tuple[list[str], dict[str, list[ShardInfo]]]:
    """The classes and each split's shards, checked (every listed shard exists)."""
    root = Path(root)
    file = root / INDEX
    if not file.is_file():
        return scan_shards(root)
    if file.stat().st_size > MAX_INDEX_BYTES:
        raise ValueError(f"{file}: over {MAX_INDEX_BYTES >> 20} MiB: not a shard index")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not JSON ({err})") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise ValueError(f"{file}: expected {{'classes': [...], 'splits': {{...}}}}")
    classes = index.get("classes")
    if not (
        isinstance(classes, list)
        and classes
        and all(isinstance(c, str) and c for c in classes)
        and len(set(classes)) == len(classes)
    ):
        raise ValueError(f"{file}: classes must be a list of distinct non-empty names")
    unknown = set(index["splits"]) - set(SPLITS)
    if unknown:
        raise ValueError(f"{file}: unknown splits {sorted(unknown)} (expected train, val)")
    splits = {}
    for split, entries in index["splits"].items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{file}: split {split} lists no shards")
        splits[split] = [_checked_shard(e, root, f"{file} ({split})") for e in entries]
    return classes, splits


def _found_shards(root: Path) -> dict[str, list[Path]]:
    """Shards made elsewhere: ``train*.tar`` and ``val*.tar`` (or ``validation*``), in
    ``DIR`` or in ``DIR/train/`` and ``DIR/val/``."""
    found: dict[str, list[Path]] = {}
    for split, names in (("train", ("train",)), ("val", ("val", "validation"))):
        paths = [p for n in names for p in (*root.glob(f"{n}*.tar"), *root.glob(f"{n}/*.tar"))]
        if paths:
            found[split] = sorted(set(paths))
    return found


def scan_shards(root: Path) -> tuple[list[str], dict[str, list[ShardInfo]]]:
    """The classes and shards of a folder of shards without ``index.json``: each shard is
    read through (labels read, images skipped) to count its samples; the classes are ``0``
    .. the largest label. Logged, since it reads every shard once."""
    found = _found_shards(root)
    if "train" not in found and "val" not in found:
        raise FileNotFoundError(
            f"{root} has no {INDEX} and no train*.tar or val*.tar shards (cait shards writes both)"
        )
    logger.info("%s: no %s; counting the samples of its shards", root, INDEX)
    splits, top = {}, -1
    for split, paths in found.items():
        splits[split] = []
        for path in paths:
            count = 0
            for ordinal, _, parts in read_shard(path, labels_only=True):
                if ordinal < 0:
                    raise ValueError(parts)  # a damaged shard is named before training
                count += 1
                label = _label(parts.get(LABEL_EXTENSION, b""), MAX_SCANNED_CLASSES)
                top = max(top, label if isinstance(label, int) else -1)
            splits[split].append(ShardInfo(path, count))
    if top < 0:
        raise ValueError(f"{root}: no sample with a .cls label in its shards")
    return [str(i) for i in range(top + 1)], splits


def _label(data: bytes, classes: int) -> int | str:
    """The label a ``.cls`` member holds, or why it is not one."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return f"label {data[:20]!r} is not an integer"
    if not 0 <= label < classes:
        return f"label {label} is outside [0, {classes})"
    return label


def read_shard(
    path: Path, wanted: set[int] | None = None, labels_only: bool = False
) -> Iterator[tuple[int, str, dict[str, bytes]] | tuple[int, str, str]]:
    """The samples of a shard in file order: ``(ordinal, key, {extension: bytes})``, only
    the data of the ordinals in ``wanted`` (all without it; the others are skipped by seeking
    past them), only the labels with ``labels_only``. A shard that ends early yields
    ``(-1, "", reason)`` and stops."""
    ordinal, key, parts = -1, None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                stem, _, extension = name.partition(".")
                if stem != key:
                    if key is not None:
                        yield ordinal, key, parts
                    ordinal, key, parts = ordinal + 1, stem, {}
                if labels_only and extension.lower() != LABEL_EXTENSION:
                    parts[extension.lower()] = b""
                elif (wanted is None or ordinal in wanted) and member.size <= MAX_FILE_BYTES:
                    parts[extension.lower()] = tar.extractfile(member).read()
                elif member.size > MAX_FILE_BYTES:
                    parts[extension.lower()] = b""  # reported as not an image
    except (tarfile.TarError, OSError, EOFError) as err:
        yield -1, "", f"{path}: unreadable after sample {ordinal + 1} ({err})"
        return
    if key is not None:
        yield ordinal, key, parts


class ShardStream(IterableDataset):
    """One split of a shard folder, streamed (see the module's docstring for the plan).

    Without :meth:`batched`, it yields samples, rank 0 of 1 (for ``DataLoader(stream,
    batch_size=B)``); :meth:`batched` makes it yield collated batches planned for one rank
    of a run, for ``DataLoader(stream, batch_size=None)``.
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        classes: Sequence[str],
        own_classes: Sequence[str],
        transform: Callable | None,
        train: bool,
        where: str,
    ) -> None:
        self.shards = list(shards)
        self.classes = list(classes)
        self.mapping = class_mapping(own_classes, classes, where)
        # train: an unreadable sample is replaced (batches keep their size); the plan's
        # shuffling and dropping are the loader's choice (batched)
        self.transform, self.substitute, self.where = transform, train, where
        self.train = False
        self.total = sum(s.samples for s in self.shards)
        if self.total == 0:
            raise ValueError(f"{where}: its shards hold no samples")
        self.skipped: list[str] = []
        self.limit: int | None = None  # read only the first samples of the plan (take)
        self.keyed = False  # samples are (image, label, skipped, key), not (image, label, skipped)
        self.batch_size: int | None = None
        self.collate: Callable | None = None
        self.seed, self.epoch, self.repeats, self.rank, self.world, self.workers = 0, 0, 1, 0, 1, 1

    def batched(
        self,
        batch_size: int,
        collate: Callable,
        workers: int,
        train: bool = False,
        seed: int = 0,
        repeats: int = 1,
        rank: int = 0,
        world: int = 1,
    ) -> ShardStream:
        """Yield batches of ``batch_size`` collated by ``collate`` for rank ``rank`` of
        ``world`` with ``workers`` loader workers: shuffled whole batches for ``train``,
        every sample in order for evaluation; returns itself."""
        self.batch_size, self.collate, self.workers = batch_size, collate, max(1, workers)
        self.train = train
        self.seed, self.repeats, self.rank, self.world = seed, repeats, rank, world
        if self.train:
            part = self.total // world
            dropped = self.total - world * part + world * (part % batch_size)
            logger.info(
                "%s: %d samples; each epoch leaves out %d (equal parts for %d rank(s), "
                "whole batches of %d)",
                self.where,
                self.total,
                dropped,
                world,
                batch_size,
            )
        return self

    def encoded(self) -> Iterator[tuple[str, bytes | str, int]]:
        """Every sample in file order as ``(key, image bytes or why not, label)``."""
        for info in self.shards:
            for ordinal, name, parts in read_shard(info.path):
                if ordinal < 0:
                    yield str(info.path), parts, 0
                    break
                label = _label(parts.get(LABEL_EXTENSION, b""), len(self.mapping))
                image = next((parts[e] for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
                if isinstance(label, str) or image is None:
                    why = label if isinstance(label, str) else "no image member"
                    yield f"{info.path}#{name}", why, 0
                else:
                    yield f"{info.path}#{name}", image, self.mapping[label]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _part(self) -> tuple[int, int]:
        """This rank's range in the epoch's sequence of samples."""
        if self.train:
            size = self.total // self.world
            return self.rank * size, (self.rank + 1) * size
        edges = [self.total * r // self.world for r in range(self.world + 1)]
        return edges[self.rank], edges[self.rank + 1]

    def plan(self) -> list[tuple[int, int]]:
        """This rank's samples this epoch, in order: ``(shard index, ordinal in shard)``."""
        order = list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + self.epoch)
        if self.train:
            order = torch.randperm(len(order), generator=generator).tolist()
        start, end = self._part()
        samples, offset = [], 0
        for shard in order:
            count = self.shards[shard].samples
            lo, hi = max(start, offset), min(end, offset + count)
            offset += count
            if lo >= hi:
                continue
            within = torch.arange(lo - offset + count, hi - offset + count)
            if self.train:
                within = within[torch.randperm(len(within), generator=generator)]
            samples += [(shard, i) for i in within.tolist()]
        if self.repeats > 1:
            samples = [s for s in samples for _ in range(self.repeats)][: end - start]
        return samples[: self.limit]

    def _units(self) -> list[list[tuple[int, int]]]:
        """This rank's batches (single samples when not batched), all workers'."""
        samples = self.plan()
        size = self.batch_size or 1
        units = [samples[i : i + size] for i in range(0, len(samples), size)]
        if self.train and self.batch_size and units and len(units[-1]) < size:
            units.pop()
        return units

    def __len__(self) -> int:
        start, end = self._part()
        samples = min(end - start, self.limit if self.limit is not None else end - start)
        size = self.batch_size or 1
        whole = self.train and self.batch_size  # training drops the last partial batch
        return samples // size if whole else math.ceil(samples / size)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self._units()[worker::workers]
        reader = _Reader(self, mine)
        for unit in mine:
            samples = [reader.sample(shard, ordinal) for shard, ordinal in unit]
            if not self.keyed:
                samples = [sample[:3] for sample in samples]
            yield self.collate(samples) if self.batch_size else samples[0]
            reader.release_before(unit[-1][0])


class _Reader:
    """One worker's samples, read a shard at a time: the raw bytes of the samples it will
    use from a shard are held until its batches are past that shard."""

    def __init__(self, stream: ShardStream, units: list[list[tuple[int, int]]]) -> None:
        self.stream = stream
        self.held: dict[int, dict[int, tuple[str, dict[str, bytes]]]] = {}
        self.problems: dict[int, str] = {}
        self.needed: dict[int, set[int]] = {}
        self.last_good: tuple[int, int] | None = None  # (shard, ordinal) last read whole
        for unit in units:
            for shard, ordinal in unit:
                self.needed.setdefault(shard, set()).add(ordinal)

    def _load(self, shard: int) -> None:
        info = self.stream.shards[shard]
        records: dict[int, tuple[str, dict[str, bytes]]] = {}
        for ordinal, key, parts in read_shard(info.path, self.needed.get(shard, set())):
            if ordinal < 0:
                self.problems[shard] = parts  # the reason
                break
            records[ordinal] = (key, parts)
        self.held[shard] = records

    def release_before(self, shard: int) -> None:
        keep = {shard, self.last_good[0] if self.last_good else shard}
        for other in [s for s in self.held if s not in keep]:
            del self.held[other]

    def _decode(self, shard: int, ordinal: int) -> tuple[KeyedSample, str]:
        info, stream = self.stream.shards[shard], self.stream
        key = f"{info.path}#{ordinal}"
        if ordinal not in self.held[shard]:
            why = self.problems.get(shard, f"{info.path}: holds fewer samples than its index says")
            return (None, 0, (), key), f"{key}: missing ({why})"
        name, parts = self.held[shard][ordinal]
        key = f"{info.path}#{name}"
        label = _label(parts.get(LABEL_EXTENSION, b""), len(stream.mapping))
        if isinstance(label, str):
            return (None, 0, (), key), f"{key}: {label}"
        image = next((parts[e] for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            return (None, 0, (), key), f"{key}: no image member ({', '.join(sorted(parts))})"
        img, problem = read_sample(image, key, stream.transform)
        return (img, stream.mapping[label], (), key), problem

    def sample(self, shard: int, ordinal: int) -> KeyedSample:
        """The sample, or (training) a readable one in its place: the next this worker
        holds from the same shard, else the last it read; the skipped one is named. In
        evaluation: no image, the problem named."""
        if shard not in self.held:
            self._load(shard)
        sample, problem = self._decode(shard, ordinal)
        if not problem:
            self.last_good = (shard, ordinal)
            return sample
        if not self.stream.substitute:
            return None, 0, (problem,), sample[3]
        held = sorted(self.held[shard])
        candidates = [(shard, o) for o in held if o > ordinal] + [
            (shard, o) for o in held if o < ordinal
        ]
        if self.last_good is not None and self.last_good[0] in self.held:
            candidates.append(self.last_good)
        for other in candidates:
            substitute, trouble = self._decode(*other)
            if not trouble:
                return substitute[0], substitute[1], (problem,), substitute[3]
        raise ValueError(
            f"{self.stream.shards[shard].path}: no readable sample in it or before it in this "
            f"loader worker's part ({problem})"
        )


class ShardSource(Source):
    prefix = "shards"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.root = Path(location).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder not found: {self.root}")
        self.classes, self.splits = read_index(self.root)

    def split(
        self,
        name: SplitName,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        train: bool = False,
    ) -> ShardStream:
        if name not in self.splits:
            raise ValueError(f"{self.root / INDEX} lists no {name} shards")
        labels = classes if classes is not None else self.classes
        return ShardStream(
            self.splits[name], labels, self.classes, transform, train, f"{self} ({name})"
        )
