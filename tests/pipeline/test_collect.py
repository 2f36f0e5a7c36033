"""The collect stage (``lit_rlhf.pipeline.collect``): pairs, held-out prompts, the preference files it writes."""

import pytest

from lit_rlhf.data import read_preferences
from lit_rlhf.pipeline.collect import all_pairs, split_prompts


def test_all_pairs():
    assert all_pairs(2) == [(0, 1)]
    assert all_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(all_pairs(4)) == 6  # 4 · 3 / 2


def test_split_prompts_holds_out_a_seeded_share():
    prompts = [f"p{i}" for i in range(10)]
    held = split_prompts(prompts, 0.2, seed=0)
    assert len(held) == 2 and held <= set(prompts)
    assert split_prompts(prompts, 0.2, seed=0) == held
    assert split_prompts(prompts, 0.0, seed=0) == set()
    assert len(split_prompts(["a", "b"], 0.01, seed=0)) == 1  # at least one ...
    assert len(split_prompts(["a", "b"], 0.9, seed=0)) == 1  # ... and never all
    with pytest.raises(ValueError, match="val_fraction"):
        split_prompts(prompts, 1.0, seed=0)


def test_tiny_pipeline_writes_preferences_in_the_data_module_format(tiny_run):
    pairs = read_preferences(tiny_run / "collect" / "train.jsonl")
    held_out = read_preferences(tiny_run / "collect" / "val.jsonl")
    # 8 prompts × 3 samples: 3 pairs per prompt, 2 of the 8 prompts (val_fraction 0.25) held out.
    assert len(pairs) + len(held_out) == 24
    assert len(held_out) == 6
    assert {p.prompt for p in pairs}.isdisjoint({p.prompt for p in held_out})
