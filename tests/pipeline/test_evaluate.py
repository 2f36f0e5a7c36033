"""The evaluate stage (``lit_rlhf.pipeline.evaluate``): outcomes and Elo matches by hand."""

import torch

from lit_rlhf.pipeline.evaluate import elo_matches, outcomes


def test_outcomes_and_elo_matches():
    # higher wins (1), equal ties (0.5), lower loses (0)
    assert outcomes(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.5])).tolist() == [1.0, 0.5, 0.0]
    gold = {"initial": torch.tensor([0.0, 0.5]), "iter 1": torch.tensor([0.5, 0.5]), "iter 2": torch.tensor([1.0, 0.0])}
    matches = elo_matches(gold)
    # 3 pairs of checkpoints × 2 matched samples
    assert matches == [
        ("initial", "iter 1", 0.0),
        ("initial", "iter 1", 0.5),
        ("initial", "iter 2", 0.0),
        ("initial", "iter 2", 1.0),
        ("iter 1", "iter 2", 0.0),
        ("iter 1", "iter 2", 1.0),
    ]
