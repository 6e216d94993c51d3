"""Samplers whose order depends only on ``(seed, epoch)``, sharded over the ranks of a run.

A resumed run sees the same order as an uninterrupted one. With ``num_replicas`` processes
rank ``r`` takes every ``num_replicas``-th index, so batch ``s`` of every rank together are
the images of batch ``s`` of one process with the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["RepeatedAugSampler", "ShardSampler", "ShuffleSampler", "build_train_sampler"]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # one stream per (seed, epoch); the multiplier is any odd constant larger than the
    # number of epochs, so that no two (seed, epoch) pairs share a stream
    return torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch)


_EPOCH_STRIDE = 100_003


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")


class RepeatedAugSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``).

    Each epoch the shuffled indices are repeated ``repeats`` times in a row
    (``[i, i, i, j, j, j, ...]``) and dealt to the ranks in turn, so the copies of an image
    get different augmentations on different ranks (or, on one process, sit in the same
    batch). Each rank keeps ``size // num_replicas`` samples, the epoch length of plain
    shuffling, so an epoch has the same number of steps and covers
    about ``1 / repeats`` of the distinct images. The order depends only on
    ``(seed, epoch)``.

    ``repeats=1`` is plain shuffling (:class:`ShuffleSampler`): rank ``r`` takes
    ``order[r::num_replicas]``, cut to ``size // num_replicas`` so that every rank has as
    many samples and none is shared (the last ``size % num_replicas`` of each epoch's order
    are left out; which ones changes every epoch).
    """

    def __init__(
        self, size: int, repeats: int, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        _check_rank(num_replicas, rank)
        self.size = size
        self.repeats = repeats
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=_epoch_generator(self.seed, self.epoch))
        repeated = order.repeat_interleave(self.repeats).tolist()
        mine = repeated[self.rank :: self.num_replicas]
        return iter(mine[: self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


class ShuffleSampler(RepeatedAugSampler):
    """Plain shuffling: :class:`RepeatedAugSampler` with ``repeats=1``."""

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(size, 1, seed, num_replicas, rank)


class ShardSampler(Sampler[int]):
    """Evaluation order: rank ``r`` of ``num_replicas`` takes indices ``r, r + n, ...``.

    No padding (unlike ``DistributedSampler``): the shards differ in length by at most one
    and together hold every index exactly once, so summed counts are exact.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        _check_rank(num_replicas, rank)
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


def build_train_sampler(
    dataset: Dataset, repeats: int, seed: int, num_replicas: int = 1, rank: int = 0
) -> Sampler[int]:
    """Plain shuffling, or repeated augmentation when ``repeats > 1``; sharded by rank."""
    return RepeatedAugSampler(len(dataset), repeats, seed, num_replicas, rank)
