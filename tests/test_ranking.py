"""K-wise ranking losses (``lit_rlhf.ranking``) on numbers worked out by hand: InstructGPT's pairwise loss, the
Plackett–Luce likelihood, ties, padding of rows with fewer responses, and agreement with Bradley–Terry on pairs."""

import math

import torch

from lit_rlhf.ranking import (
    comparisons,
    pair_differences,
    pairwise_ranking_loss,
    plackett_luce_loss,
    ranking_centering,
)
from lit_rlhf.reward import bradley_terry_loss

# Row 0: three responses, rewards [2, 1, 0], ranked in that order. Row 1: two responses with rewards [0, 0], the
# second ranked better, and an empty third slot (its reward 5 must not count).
REWARDS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
SCORES = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 9.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def softplus(x: float) -> float:
    """-log σ(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def test_comparisons_leave_out_empty_slots_and_ties():
    better = comparisons(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[True, True, True]]))
    # 0 and 1 tie: neither beats the other; both beat 2.
    assert better[0].tolist() == [[False, False, True], [False, False, True], [False, False, False]]
    assert comparisons(SCORES, MASK)[1].tolist() == [[False] * 3, [True, False, False], [False] * 3]


def test_pairwise_loss_by_hand():
    # Row 0: pairs (0,1) gap 1 -> 0.313262, (0,2) gap 2 -> 0.126928, (1,2) gap 1 -> 0.313262; mean over C(3,2) = 3
    # is 0.251151. Row 1: one pair, gap 0 -> log 2 = 0.693147. Mean over the two prompts: 0.472149.
    row0 = (softplus(1) + softplus(2) + softplus(1)) / 3
    expected = (row0 + math.log(2)) / 2
    assert math.isclose(pairwise_ranking_loss(REWARDS, SCORES, MASK).item(), expected, rel_tol=1e-6)
    assert math.isclose(expected, 0.472149, rel_tol=1e-5)


def test_pairwise_loss_weighs_each_prompt_once():
    # Pooled over the batch's 4 pairs the mean would be (0.753452 + 0.693147) / 4 = 0.361650; per prompt first it is
    # 0.472149: row 1's single pair weighs as much as row 0's three.
    pooled = (2 * softplus(1) + softplus(2) + math.log(2)) / 4
    assert not math.isclose(pairwise_ranking_loss(REWARDS, SCORES, MASK).item(), pooled, rel_tol=1e-3)


def test_pairwise_loss_margin_by_hand():
    # Row 1 with margin 1: gap 0 - 1 = -1 -> log(1 + e) = 1.313262; row 0 unchanged (margin 0). Mean 0.782207.
    margin = torch.tensor([0.0, 1.0])
    expected = ((2 * softplus(1) + softplus(2)) / 3 + softplus(-1)) / 2
    assert math.isclose(pairwise_ranking_loss(REWARDS, SCORES, MASK, margin).item(), expected, rel_tol=1e-6)


def test_plackett_luce_by_hand():
    # Row 0: first choice 2 - log(e^2 + e^1 + e^0) = 2 - log 11.107338 = -0.407606; second 1 - log(e^1 + e^0) =
    # 1 - 1.313262 = -0.313262; the last response is the only one left (term 0). NLL 0.720868.
    # Row 1: 0 - log(e^0 + e^0) = -log 2 -> 0.693147. Mean 0.707008.
    row0 = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    assert math.isclose(row0, 0.720868, rel_tol=1e-5)
    loss = plackett_luce_loss(REWARDS, SCORES, MASK)
    assert math.isclose(loss.item(), (row0 + math.log(2)) / 2, rel_tol=1e-6)


def test_plackett_luce_ties_are_not_compared():
    # Scores [1, 1, 0], rewards 0: responses 0 and 1 each pick from themselves and response 2 only: 2 · log 2 =
    # 1.386294. Their gradients: -(1 - 1/2) = -0.5 each; response 2 is in both pools with weight 1/2: +1.
    rewards = torch.zeros(1, 3, requires_grad=True)
    loss = plackett_luce_loss(rewards, torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert math.isclose(loss.item(), 2 * math.log(2), rel_tol=1e-6)
    assert rewards.grad.tolist() == [[-0.5, -0.5, 1.0]]
    # The pairwise loss compares (0, 2) and (1, 2) only: log 2 each, mean log 2.
    pairwise = pairwise_ranking_loss(torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3).bool())
    assert math.isclose(pairwise.item(), math.log(2), rel_tol=1e-6)


def test_both_losses_are_bradley_terry_on_pairs():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 0.5])
    rewards = torch.stack([chosen, rejected], dim=1)
    scores = torch.tensor([[1.0, 0.0]]).expand(3, 2)
    mask = torch.ones(3, 2, dtype=torch.bool)
    expected = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(pairwise_ranking_loss(rewards, scores, mask), expected)
    torch.testing.assert_close(plackett_luce_loss(rewards, scores, mask), expected)


def test_padding_slots_get_no_gradient():
    rewards = REWARDS.clone().requires_grad_(True)
    (pairwise_ranking_loss(rewards, SCORES, MASK) + plackett_luce_loss(rewards, SCORES, MASK)).backward()
    assert rewards.grad[1, 2].item() == 0.0 and torch.isfinite(rewards.grad).all()


def test_rows_without_a_comparison_do_not_count():
    # Row 1 all tied: the loss is row 0's alone (0.251151), not halved.
    scores = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = (2 * softplus(1) + softplus(2)) / 3
    assert math.isclose(pairwise_ranking_loss(REWARDS, scores, mask).item(), expected, rel_tol=1e-6)
    assert math.isclose(plackett_luce_loss(REWARDS, scores, mask).item(), 0.720868, rel_tol=1e-5)


def test_centering_and_pair_differences_by_hand():
    # Row 0: (2+1)^2 = 9, (2+0)^2 = 4, (1+0)^2 = 1 -> mean 14/3; row 1: (0+0)^2 = 0. Mean over rows 7/3.
    assert math.isclose(ranking_centering(REWARDS, MASK).item(), 7 / 3, rel_tol=1e-6)
    # A pair's term is (r_c + r_r)^2, as in bradley_terry_loss's centering.
    assert ranking_centering(torch.tensor([[2.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)).item() == 9.0
    # Row 0's comparisons 0>1, 0>2, 1>2 give gaps 1, 2, 1; row 1's 1>0 gives 0.
    assert pair_differences(REWARDS, SCORES, MASK).tolist() == [1.0, 2.0, 1.0, 0.0]
