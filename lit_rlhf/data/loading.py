"""DataLoader construction shared by the data modules: shuffling that is a function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``, so a resumed run replays the same order.

    Lightning calls ``set_epoch`` on a sampler that has it before each training epoch (under DDP it swaps in a
    ``DistributedSampler``, which follows the same seed-plus-epoch rule).
    """

    def __init__(self, data: Sized, seed: int) -> None:
        self.size = len(data)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled in the seed-and-epoch order when ``shuffle``, else in file order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSeededSampler(dataset, seed) if shuffle else None,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
