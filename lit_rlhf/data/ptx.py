"""The second text stream of PPO-ptx (Ouyang et al. 2022, eq. 2): SFT or plain-text rows drawn without end beside
the prompts, so each RL iteration also gets a batch to keep the language-modelling log-likelihood up."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset


class EndlessSamples(IterableDataset):
    """The items of ``dataset`` in a seeded random order, reshuffled at every pass, without end (a stream that must
    not run out before the prompts do). Each process of a distributed run draws its own order (seed + rank).

    ``drawn`` counts the items handed out; ``skip`` makes the next iteration start after that many, at the level of
    indices (no item is encoded for them), so a resumed run continues the stream where it stood.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        if len(dataset) == 0:
            raise ValueError("the ptx stream has no rows.")
        self.dataset, self.seed = dataset, seed
        self.drawn, self.skip = 0, 0

    def indices(self) -> Iterator[int]:
        """The endless index order of this process."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(self.seed + rank)
        for _ in itertools.count():
            yield from torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        self.drawn, self.skip = self.skip, 0
        for index in itertools.islice(self.indices(), self.drawn, None):
            self.drawn += 1
            yield self.dataset[index]


class StreamLoader(DataLoader):
    """A DataLoader over ``EndlessSamples`` that Lightning checkpoints: its state is the number of items drawn."""

    dataset: EndlessSamples

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.dataset.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.skip = int(state["drawn"])
