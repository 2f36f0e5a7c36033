"""Metrics on numbers worked out by hand."""

import math
import random

import pytest
import torch

from lit_rlhf.metrics import DistinctN, WinRate, distinct_n, elo_ratings, expected_score, sequence_perplexity

TEXTS = ["the cat sat", "the cat ran"]


def test_distinct_n_by_hand():
    # unigrams: the cat sat the cat ran -> 6 in all, 4 unique (the, cat, sat, ran): 4/6
    assert distinct_n(TEXTS, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 in all, 3 unique: 3/4
    assert distinct_n(TEXTS, 2) == pytest.approx(3 / 4)
    # a one-word text has no bigram at all
    assert distinct_n(["hello"], 2) == 0.0


def test_distinct_metric_pools_batches_and_ranks():
    metric = DistinctN(n=1)
    metric.update(TEXTS[:1])
    metric.update(TEXTS[1:])
    # the repeat of "the cat" in the second batch must not count again: 4/6 as on the pooled corpus
    assert metric.compute().item() == pytest.approx(4 / 6)

    # two "ranks" holding one text each, merged the way a distributed sync concatenates the states
    rank0, rank1 = DistinctN(n=2), DistinctN(n=2)
    rank0.update(TEXTS[:1])
    rank1.update(TEXTS[1:])
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(3 / 4)

    assert DistinctN(n=2).compute().item() == 0.0
    with pytest.raises(ValueError, match="n-gram order"):
        DistinctN(n=0)


def test_win_rate_outcomes_and_scores():
    metric = WinRate()
    metric.update(torch.tensor([1.0, 0.5, 0.0, 1.0]))
    # (2 wins + 0.5 · 1 tie) / 4 = 0.625
    assert metric.compute().item() == pytest.approx(0.625)

    metric = WinRate(tie_margin=0.05)
    # diffs: +0.8 win, +0.03 tie (within 0.05), -0.2 loss -> (1 + 0.5) / 3 = 0.5
    metric.update(torch.tensor([0.9, 0.23, 0.5]), torch.tensor([0.1, 0.2, 0.7]))
    assert metric.compute().item() == pytest.approx(0.5)
    metric.update([1.0])  # plain lists of outcomes are fine: (2 + 0.5) / 4
    assert metric.compute().item() == pytest.approx(0.625)

    with pytest.raises(ValueError, match="outcomes must be"):
        WinRate().update(torch.tensor([0.7]))
    assert math.isnan(WinRate().compute().item())


def test_sequence_perplexity_by_hand():
    logprobs = torch.tensor(
        [
            [math.log(0.5), math.log(0.25), -9.0],  # last token is padding
            [math.log(0.1), -9.0, -9.0],
            [-1.0, -1.0, -1.0],
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    ppl = sequence_perplexity(logprobs, mask)
    # row 0: mean NLL = (ln 2 + ln 4) / 2 = 1.5 ln 2 -> 2^1.5 = 2.8284; row 1: 1 / 0.1 = 10; row 2: nothing counts
    assert ppl[0].item() == pytest.approx(2**1.5)
    assert ppl[1].item() == pytest.approx(10.0)
    assert math.isnan(ppl[2].item())
    with pytest.raises(ValueError, match="mask"):
        sequence_perplexity(logprobs, mask[:, :2])


def test_elo_two_players_by_hand():
    # A wins 3 of 4: the MLE sets P(A beats B) = 3/4, so 10^(ΔR/400) = 3 and ΔR = 400·log10(3) = 190.85;
    # centred on 1000: A = 1095.42, B = 904.58
    ratings = elo_ratings([("A", "B", 1.0)] * 3 + [("A", "B", 0.0)])
    assert ratings["A"] == pytest.approx(1000 + 200 * math.log10(3), abs=1e-6)
    assert ratings["B"] == pytest.approx(1000 - 200 * math.log10(3), abs=1e-6)
    assert expected_score(ratings["A"], ratings["B"]) == pytest.approx(0.75)
    # two draws: equal ratings
    assert elo_ratings([("A", "B", 0.5), ("B", "A", 0.5)]) == pytest.approx({"A": 1000.0, "B": 1000.0})


def test_elo_recovers_consistent_three_player_data_independent_of_order():
    # Strengths γ = 4, 2, 1 give P(A>B) = 4/6 = 2/3, P(B>C) = 2/3, P(A>C) = 4/5. Results in exactly those ratios
    # satisfy the likelihood equations, so the MLE is γ itself: R_A − R_C = 400·log10 4 = 240.82,
    # R_B − R_C = 400·log10 2 = 120.41. Anchoring C at 1000 gives A = 1240.82, B = 1120.41.
    matches = (
        [("A", "B", 1.0)] * 2
        + [("A", "B", 0.0)]
        + [("B", "C", 1.0)] * 2
        + [("C", "B", 1.0)]
        + [("A", "C", 1.0)] * 4
        + [("A", "C", 0.0)]
    )
    expected = {"A": 1000 + 400 * math.log10(4), "B": 1000 + 400 * math.log10(2), "C": 1000.0}
    assert elo_ratings(matches, anchor="C") == pytest.approx(expected, abs=1e-6)
    shuffled = matches[:]
    random.Random(0).shuffle(shuffled)
    assert elo_ratings(shuffled, anchor="C") == pytest.approx(expected, abs=1e-6)


def test_elo_perfect_record_needs_prior():
    matches = [("A", "B", 1.0)] * 3
    with pytest.raises(ValueError, match="prior_draws"):
        elo_ratings(matches)
    # With one virtual draw each against a phantom at θ = 0 the fit is symmetric (θ_A = t = −θ_B) and solves
    # 3·(1 − σ(2t)) = σ(t) − 1/2, whose root is t = 1.17068 (bisection); ΔR = 2t·400/ln 10 = 406.73.
    ratings = elo_ratings(matches, prior_draws=1.0)
    assert ratings["A"] - ratings["B"] == pytest.approx(406.734, abs=1e-2)
    assert (ratings["A"] + ratings["B"]) / 2 == pytest.approx(1000.0)


def test_elo_rejects_bad_input():
    with pytest.raises(ValueError, match="score 2"):
        elo_ratings([("A", "B", 2)])
    with pytest.raises(ValueError, match="against itself"):
        elo_ratings([("A", "A", 1.0)])
    with pytest.raises(ValueError, match="anchor 'Z'"):
        elo_ratings([("A", "B", 0.5)], anchor="Z")
    with pytest.raises(ValueError, match="disconnected"):
        elo_ratings([("A", "B", 0.5), ("C", "D", 0.5)])
