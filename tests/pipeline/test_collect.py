"""The collect stage (``lit_rlhf.pipeline.collect``): pairs, held-out prompts, rankings from wins, the preference files
it writes in either format."""

import json

import pytest

from lit_rlhf.data import RankingExample, read_preferences
from lit_rlhf.pipeline.collect import all_pairs, rank_by_wins, split_prompts
from tests.pipeline.support import run


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


def label(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_rank_by_wins_scores_the_share_of_pairs_won():
    labels = [
        # p: a beat b and c, c beat b: shares a 2/2, b 0/2, c 1/2.
        label("p", "a", "b"),
        label("p", "a", "c"),
        label("p", "c", "b"),
        # q: a cycle, x > y > z > x: every share 1/2, no order, no ranking.
        label("q", "x", "y"),
        label("q", "y", "z"),
        label("q", "z", "x"),
        # r: a tie was dropped, so u took part in one pair only: u 1/1, v 1/2, w 0/1.
        label("r", "u", "v"),
        label("r", "v", "w"),
    ]
    assert rank_by_wins(labels) == [
        RankingExample("p", ("a", "b", "c"), (1.0, 0.0, 0.5)),
        RankingExample("r", ("u", "v", "w"), (1.0, 0.5, 0.0)),
    ]


def test_collect_writes_rankings_that_the_reward_stage_trains_on(tmp_path):
    run("--output_dir", str(tmp_path), "--stages", "collect,reward", "--collect.format", "rankings")
    rankings = read_preferences(tmp_path / "collect" / "train.jsonl")
    held_out = read_preferences(tmp_path / "collect" / "val.jsonl")
    assert rankings and all(isinstance(r, RankingExample) for r in rankings + held_out)
    # One row per prompt, 3 samples each; the held-out prompts (2 of 8) apart from the training ones.
    assert len({r.prompt for r in rankings}) == len(rankings) <= 6 and len(held_out) <= 2
    assert {r.prompt for r in rankings}.isdisjoint({r.prompt for r in held_out})
    assert all(len(r.responses) == 3 and len(set(r.scores)) > 1 for r in rankings)
    collect = json.loads((tmp_path / "stages" / "collect.json").read_text())["summary"]
    reward = json.loads((tmp_path / "stages" / "reward.json").read_text())["summary"]
    assert collect["format"] == "rankings" and collect["train_rankings"] == reward["train_rankings"] == len(rankings)
    assert collect["train_pairs"] == reward["train_pairs"] == sum(len(r.pairs) for r in rankings)
    assert reward["ranking_loss"] == "pairwise" and 0.0 <= reward["val_accuracy"] <= 1.0
    # The pair labels stay in annotations.jsonl: 3 per prompt.
    assert len((tmp_path / "collect" / "annotations.jsonl").read_text().splitlines()) == 24
