"""The reward stage (``lit_rlhf.pipeline.reward_model``): pair accuracy by hand, and a run without held-out prompts."""

import json

import torch

from lit_rlhf.pipeline.reward_model import pair_accuracy
from tests.pipeline.support import run


def test_pair_accuracy_counts_ties_as_wrong():
    # chosen beats rejected in rows 0 and 2, ties in row 1, loses in row 3: 2 of 4.
    assert pair_accuracy(torch.tensor([1.0, 0.5, 2.0, 0.0]), torch.tensor([0.0, 0.5, 1.0, 1.0])) == 0.5


def test_the_reward_stage_runs_when_no_prompt_is_held_out(tmp_path):
    # collect.val_fraction 0 leaves collect/val.jsonl empty: the stage trains without validation.
    run("--output_dir", str(tmp_path), "--stages", "collect,reward", "--collect.val_fraction", "0")
    assert (tmp_path / "collect" / "val.jsonl").read_text() == ""
    summary = json.loads((tmp_path / "stages" / "reward.json").read_text())["summary"]
    assert summary["train_pairs"] == 24 and summary["val_pairs"] == 0 and "val_accuracy" not in summary
