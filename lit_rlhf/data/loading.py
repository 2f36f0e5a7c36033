"""What the data modules share: split handling and loaders whose shuffle order is a function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.formats import split_off
from lit_rlhf.models import load_tokenizer, resolve


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


class SplitDataModule(L.LightningDataModule):
    """What the file-backed data modules share: train / val / test sources or a seeded validation carve-out of the
    training rows, the tokenizer loaded on first use, per-split counts, and loaders shuffled by (seed, epoch).

    Subclasses implement ``read_split`` (rows of one source, filling the counts), ``make_dataset`` and
    ``make_collator``, and call ``configure_splits`` from their ``__init__``.
    """

    def configure_splits(
        self,
        tokenizer: str,
        paths: dict[str, str | None],
        splits: dict[str, str],
        val_fraction: float,
        seed: int,
        batch_size: int,
        num_workers: int,
    ) -> None:
        if paths["val"] is not None and val_fraction:
            raise ValueError("Give either val_path or val_fraction, not both.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        self.tokenizer_name = tokenizer
        self.paths, self.splits = paths, splits
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.stats: dict[str, dict[str, int]] = {}
        """Counts per split (``rows``, ``kept``, ``invalid`` and the subclass's own; ``held_out`` on train when
        ``val_fraction`` carves a validation set)."""
        self.examples: dict[str, list] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def read_split(self, path: str, split_name: str, stats: dict[str, int]) -> list:
        """The examples of one source (``split_name`` names the split of folder / hub sources)."""
        raise NotImplementedError

    def make_dataset(self, examples: list) -> Dataset:
        raise NotImplementedError

    def make_collator(self) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (right padding), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, padding_side="right")
        return self._tokenizer

    def prepare_data(self) -> None:
        resolve(self.tokenizer_name)  # builds a bundled checkpoint once, on one process

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in needed.get(stage, ["train", "val", "test"]) if stage else ["train", "val", "test"]:
            self._load(split)

    def _load(self, split: str) -> None:
        if split in self.examples:
            return
        if split == "val" and self.val_fraction:
            self._load("train")
            return
        path = self.paths[split]
        if path is None:
            if split == "train":
                raise ValueError(f"{type(self).__name__} needs train_path to fit (data.train_path in the config).")
            return
        stats: dict[str, int] = {}
        examples = self.read_split(path, self.splits[split], stats)
        if split == "train" and self.val_fraction:
            examples, val = split_off(examples, self.val_fraction, self.seed)
            stats["held_out"], stats["kept"] = len(val), len(examples)
            self.examples["val"] = val
            self.stats["val"] = {key: 0 for key in stats if key != "held_out"} | {"rows": len(val), "kept": len(val)}
        self.examples[split] = examples
        self.stats[split] = stats

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self._load(split)
        if split not in self.examples:
            return []  # type: ignore[return-value]  # Lightning treats an empty list as "no batches"
        dataset = self.make_dataset(self.examples[split])
        return make_loader(dataset, self.batch_size, shuffle, self.seed, self.num_workers, self.make_collator())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
