"""``SFTModule`` (``lit_rlhf.sft``): the completion NLL against numbers worked out by hand."""

import math

import torch

from lit_rlhf.sft import completion_nll


def test_completion_nll_counts_only_labelled_tokens():
    # Vocabulary of 2; uniform logits give log 2 per predicted token.
    logits = torch.zeros(1, 4, 2)
    # Position 0 is the prompt (-100), tokens 1..3 are the completion; position t predicts label t+1,
    # so labels[1:] = [1, 0, -100] -> two counted tokens, each log 2.
    labels = torch.tensor([[-100, 1, 0, -100]])
    nll, count = completion_nll(logits, labels)
    assert count.tolist() == [2]
    assert math.isclose(nll.item(), 2 * math.log(2), rel_tol=1e-6)


def test_completion_nll_confident_correct_prediction_is_cheap():
    logits = torch.tensor([[[0.0, 10.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])
    nll, count = completion_nll(logits, labels)
    # -log softmax([0, 10])[1] = log(1 + e^-10) = 4.53989e-05
    assert count.item() == 1
    assert math.isclose(nll.item(), math.log1p(math.exp(-10)), abs_tol=1e-6)
