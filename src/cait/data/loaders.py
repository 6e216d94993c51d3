"""Loaders of a split's batches, one function for every source: an indexed split goes
through a sampler (:mod:`cait.data.samplers`), a streamed one plans its own batches
(:class:`cait.data.sources.shards.ShardStream`). Either way a rank's batches depend only on
``(seed, epoch)`` and the rank, not on the number of loader workers.

Batches are ``(images, targets, skipped)`` (:func:`collate_samples`) or, with the samples'
keys, ``(images, targets, skipped, keys)`` (:func:`collate_keyed`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cait.data.samplers import ShardSampler, build_train_sampler
from cait.data.sources import is_streamed

__all__ = ["Loader", "collate_keyed", "collate_samples", "make_loader", "take"]


def collate_samples(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable samples; return the skipped files' descriptions beside them."""
    images, targets, skipped, _ = collate_keyed(batch)
    return images, targets, skipped


def collate_keyed(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """:func:`collate_samples` with the keys of the samples kept (in the images' order)."""
    skipped = [s for sample in batch for s in sample[2]]
    kept = [s for s in batch if s[0] is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped, []
    images = torch.stack([s[0] for s in kept])
    targets = torch.tensor([s[1] for s in kept], dtype=torch.long)
    keys = [s[3] if len(s) > 3 else "" for s in kept]
    return images, targets, skipped, keys


@dataclass
class Loader:
    """A split's loader and what sets its epoch (the sampler, or the stream itself)."""

    loader: DataLoader
    epochs: Any

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.epochs, "set_epoch"):
            self.epochs.set_epoch(epoch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds python's and its own RNG in each worker; numpy (used by some
    # augmentations) is seeded here from the same per-worker seed.
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    train: bool = False,
    workers: int = 0,
    seed: int = 0,
    repeats: int = 1,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
    collate: Callable = collate_samples,
) -> Loader:
    """This rank's batches of ``dataset``: shuffled (or repeated-augmentation) whole batches
    for training, every sample once for evaluation."""
    common = dict(num_workers=workers, pin_memory=pin_memory, worker_init_fn=_seed_worker)
    if is_streamed(dataset):
        stream = dataset.batched(batch_size, collate, workers, train, seed, repeats, rank, world)
        return Loader(DataLoader(stream, batch_size=None, **common), stream)
    if train:
        sampler = build_train_sampler(dataset, repeats, seed, world, rank)
    else:
        sampler = ShardSampler(len(dataset), world, rank)
    loader = DataLoader(
        dataset, batch_size, sampler=sampler, drop_last=train, collate_fn=collate, **common
    )
    return Loader(loader, sampler)


def take(dataset: Any, count: int) -> Any:
    """The first ``count`` samples of a split in evaluation order (all of a smaller one)."""
    if is_streamed(dataset):
        first = copy.copy(dataset)
        first.limit = count
        return first
    return Subset(dataset, range(min(count, len(dataset))))
