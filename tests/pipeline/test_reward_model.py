"""The reward stage (``lit_rlhf.pipeline.reward_model``): pair accuracy by hand."""

import torch

from lit_rlhf.pipeline.reward_model import pair_accuracy


def test_pair_accuracy_counts_ties_as_wrong():
    # chosen beats rejected in rows 0 and 2, ties in row 1, loses in row 3: 2 of 4.
    assert pair_accuracy(torch.tensor([1.0, 0.5, 2.0, 0.0]), torch.tensor([0.0, 0.5, 1.0, 1.0])) == 0.5
