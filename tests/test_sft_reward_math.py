"""Bradley–Terry loss and completion NLL against numbers worked out by hand."""

import math

import torch

from lit_rlhf.reward import bradley_terry_loss
from lit_rlhf.sft import completion_nll


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 0.0])
    # diffs [1, 0]: -log σ(1) = log(1 + e^-1) = 0.313262, -log σ(0) = log 2 = 0.693147; mean 0.503204
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert math.isclose(bradley_terry_loss(chosen, rejected).item(), expected, rel_tol=1e-6)


def test_bradley_terry_margin_and_centering_by_hand():
    chosen = torch.tensor([2.0])
    rejected = torch.tensor([1.0])
    margin = torch.tensor([1.0])
    # diff - margin = 0 -> log 2 = 0.693147; centering 0.1 * (2 + 1)^2 = 0.9; total 1.593147
    loss = bradley_terry_loss(chosen, rejected, margin, center_coef=0.1)
    assert math.isclose(loss.item(), math.log(2) + 0.9, rel_tol=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dr_c of -log σ(r_c - r_r) at 0 is -(1 - σ(0)) = -0.5; the rejected one gets +0.5
    assert chosen.grad.item() == -0.5 and rejected.grad.item() == 0.5


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
