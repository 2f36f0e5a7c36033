"""Validation carve-out and samplers: deterministic splits, shuffle order as a function of (seed, epoch), and
length-grouped batches."""

import torch

from lit_rlhf.data.loading import split_off
from lit_rlhf.data.preferences import PreferenceDataModule
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.models import TINY_LLAMA
from tests.data.test_support import EXAMPLES


def test_split_off_is_deterministic_and_disjoint():
    items = list(range(20))
    train, val = split_off(items, 0.25, seed=3)
    assert split_off(items, 0.25, seed=3) == (train, val)
    assert len(val) == 5 and sorted(train + val) == items and not set(train) & set(val)
    assert split_off(items, 0.25, seed=4) != (train, val)


def test_val_fraction_split_is_deterministic_and_disjoint():
    def split(seed):
        path = str(EXAMPLES / "preferences_tiny.jsonl")
        dm = PreferenceDataModule(TINY_LLAMA, train_path=path, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return dm

    first, again, other = split(0), split(0), split(1)
    assert first.examples["val"] == again.examples["val"] and first.examples["train"] == again.examples["train"]
    assert len(first.examples["val"]) == 10 and len(first.examples["train"]) == 30
    assert not set(first.examples["val"]) & set(first.examples["train"])
    assert set(first.examples["val"]) != set(other.examples["val"])
    assert first.stats["train"]["held_out"] == 10 and first.stats["val"]["kept"] == 10
    assert len(first.val_dataloader()) == 2  # 10 pairs, batch size 8


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    from lit_rlhf.data.loading import EpochSeededSampler

    data = list(range(10))
    first, again = EpochSeededSampler(data, seed=3), EpochSeededSampler(data, seed=3)
    epoch0 = list(first)
    assert sorted(epoch0) == data and list(again) == epoch0  # a rebuilt loader (a resumed run) replays epoch 0
    first.set_epoch(1)
    again.set_epoch(1)
    assert list(first) == list(again) != epoch0  # each epoch has its own order, also after a rebuild
    assert list(EpochSeededSampler(data, seed=4)) != epoch0


def test_length_grouped_sampler_groups_lengths_and_keeps_every_index():
    from lit_rlhf.data.loading import LengthGroupedSampler

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (203,), generator=generator).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, window_batches=5)
    order = list(sampler)
    assert sorted(order) == list(range(203))  # a permutation: nothing lost or repeated
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=1, window_batches=5)) == order  # (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 8] for i in range(0, 203, 8)]
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 3  # only the tail is short
    # The first batch holds the longest example of any full batch; padding (pad to each batch's longest) drops a lot.
    assert max(lengths[i] for i in batches[0]) == max(lengths[i] for b in batches[:-1] for i in b)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    random_order = torch.randperm(203, generator=generator).tolist()
    assert padded(batches) < 0.75 * padded([random_order[i : i + 8] for i in range(0, 203, 8)])


def test_group_by_length_in_the_preference_and_sft_modules():
    dm = PreferenceDataModule(
        TINY_LLAMA, train_path=str(EXAMPLES / "preferences_tiny.jsonl"), batch_size=4, group_by_length=True
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert type(loader.sampler).__name__ == "LengthGroupedSampler"
    assert sum(len(b["margin"]) for b in loader) == len(dm.examples["train"])
    sft = SFTDataModule(
        TINY_LLAMA, train_path=str(EXAMPLES / "sft_tiny.jsonl"), val_fraction=0.1, batch_size=4, group_by_length=True
    )
    sft.setup("fit")
    assert type(sft.train_dataloader().sampler).__name__ == "LengthGroupedSampler"
    val = sft.val_dataloader().sampler
    val.set_epoch(3)
    assert list(val) == list(range(len(sft.examples["val"])))  # evaluation keeps file order, whatever the epoch
