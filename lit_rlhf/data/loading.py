"""What the data modules share: split handling and loaders whose shuffle order is a function of (seed, epoch)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, TypeVar

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from lit_rlhf.models import load_tokenizer, resolve

T = TypeVar("T")


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``, so a resumed run replays the same order.

    Lightning calls ``set_epoch`` on a sampler that has it before each training epoch (under DDP it swaps in a
    ``DistributedSampler``, which follows the same seed-plus-epoch rule).
    """

    def __init__(self, data: Sized, seed: int, shuffle: bool = True) -> None:
        self.size = len(data)
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:  # in order; the epoch is still known, for ResumableDataLoader
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class LengthGroupedSampler(EpochSeededSampler):
    """Shuffled like ``EpochSeededSampler``, then ordered so that each run of ``batch_size`` indices holds examples of
    similar length: batches pad less, which is time saved in every forward and backward.

    The epoch's permutation is cut into windows of ``batch_size × window_batches`` examples; each window is sorted by
    length (longest first) and cut into batches; the batches are shuffled, except that the full batch holding the
    longest example comes first, so a batch that does not fit in memory fails at step 0, not hours in. Which
    examples share a window is random each epoch; within a window, batches are no longer independent draws.

    Args:
        lengths: Token length of every example.
        batch_size: The DataLoader's batch size.
        seed: As in ``EpochSeededSampler``: the order is a function of (seed, epoch).
        window_batches: Batches per sorting window: larger pads less, smaller keeps batches more random.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window_batches: int = 50) -> None:
        super().__init__(lengths, seed)
        if batch_size < 1 or window_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and window_batches ({window_batches}) must be >= 1.")
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size, self.window_batches = batch_size, window_batches

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        window = self.batch_size * self.window_batches
        batches: list[Tensor] = []
        for chunk in order.split(window):
            ranked = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(ranked.split(self.batch_size))
        if not batches:
            return iter([])
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        # Only the last window's tail can be short; it must stay last, or the DataLoader would cut a later batch in
        # two. The longest full batch goes first.
        full = [b for b in shuffled if len(b) == self.batch_size]
        short = [b for b in shuffled if len(b) < self.batch_size]
        if full:
            first = max(range(len(full)), key=lambda i: int(self.lengths[full[i]].max()))
            full.insert(0, full.pop(first))
        return iter(torch.cat(full + short).tolist())


class _ResumeAt:
    """A batch sampler that leaves out the first ``state["batches"]`` batches of indices when it iterates the epoch
    ``state["epoch"]`` (no data is loaded for them), and none of another epoch."""

    def __init__(self, batch_sampler: Any, loader: ResumableDataLoader, state: dict[str, Any]) -> None:
        self.batch_sampler, self.loader, self.state = batch_sampler, loader, state

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: this runs at the first batch, after Lightning has set the epoch on the sampler (the loader's
        # iterator is built earlier, when the epoch may not be known yet).
        same_epoch = self.loader.sampler_epoch() == self.state["epoch"]
        self.loader._skipped = int(self.state["batches"]) if same_epoch else 0
        yield from itertools.islice(iter(self.batch_sampler), self.loader._skipped, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # the epoch's length, as Lightning counts it


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: it counts the batches it handed out of the current epoch, and after
    ``load_state_dict`` it starts that epoch after them. A run resumed from a checkpoint taken in the middle of an
    epoch then continues with the next batch, as the uninterrupted run did, instead of replaying the epoch.

    The skipped batches are left out at the level of indices, so no data is read for them; the order itself is the
    sampler's, a function of (seed, epoch) (``EpochSeededSampler``, ``LengthGroupedSampler``, or under DDP the
    distributed wrapper of either). A checkpoint taken after an epoch's last batch skips nothing of the next epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position: dict[str, Any] = {"epoch": None, "batches": 0}
        self._resume: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._skipped = 0

    def sampler_epoch(self) -> int | None:
        """The epoch the sampler draws its order for (Lightning sets it before each epoch)."""
        return getattr(self.sampler, "epoch", None)

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return _ResumeAt(sampler, self, self._pending) if self._pending is not None else sampler

    def __iter__(self) -> Iterator[Any]:
        self._pending, self._resume, self._skipped = self._resume, None, 0
        try:
            batches = super().__iter__()  # reads _index_sampler now
        finally:
            self._pending = None
        return self._count(batches)

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        first = True
        for batch in batches:
            if first:  # the epoch and the skipped batches are known once the first batch is drawn
                self._position, first = {"epoch": self.sampler_epoch(), "batches": self._skipped}, False
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The epoch and how many of its batches were handed out."""
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue ``state["epoch"]`` after ``state["batches"]`` batches, when the next iteration is of that epoch."""
        self._resume = dict(state)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
    lengths: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled in the seed-and-epoch order when ``shuffle``, else in file order.
    With ``lengths`` (and ``shuffle``) batches group examples of similar length (``LengthGroupedSampler``)."""
    if not shuffle:
        sampler = EpochSeededSampler(dataset, seed, shuffle=False)
    elif lengths is not None:
        sampler = LengthGroupedSampler(lengths, batch_size, seed)
    else:
        sampler = EpochSeededSampler(dataset, seed)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn
    )


def split_off(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministically carve ``fraction`` of ``items`` (at least one) off as a validation set: ``(train, val)``.

    Both keep the original order; the same ``seed`` and items give the same split on every run and rank.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}.")
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        raise ValueError(f"val_fraction={fraction} leaves no training rows out of {len(items)}; lower it.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val = set(order[:count])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


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
        group_by_length: bool = False,
    ) -> None:
        if paths["val"] is not None and val_fraction:
            raise ValueError("Give either val_path or val_fraction, not both.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        self.tokenizer_name = tokenizer
        self.paths, self.splits = paths, splits
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers, self.group_by_length = batch_size, num_workers, group_by_length
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
        lengths = [dataset.length(i) for i in range(len(dataset))] if shuffle and self.group_by_length else None
        return make_loader(
            dataset, self.batch_size, shuffle, self.seed, self.num_workers, self.make_collator(), lengths
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order (``predict`` scores the examples of ``test_path``)."""
        return self._loader("test", shuffle=False)
