"""The gold VADER judge and the noisy Bradley–Terry annotator."""

import math

import pytest
import torch

from lit_rlhf.judges import BradleyTerryAnnotator, VaderJudge, judge_scores, preference_probability

POSITIVE = "I love this, it is wonderful!"
NEGATIVE = "This is terrible."


def number_judge(prompts: list[str], completions: list[str]) -> list[float]:
    """Scores completions that are numbers written as text, so score gaps can be set exactly."""
    return [float(c) for c in completions]


def test_vader_judge_scores_sentiment():
    scores = VaderJudge()(["p", "p", "p"], [POSITIVE, NEGATIVE, ""])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0] > 0.5 and scores[1] < -0.3 and scores[2] == 0.0  # empty text is neutral
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        VaderJudge()(["a", "b"], ["c"])


def test_preference_probability_by_hand():
    a, b = torch.tensor([0.3, 0.0, 0.5]), torch.tensor([0.2, 0.0, 0.9])
    # T = 0.1: gaps +0.1, 0, -0.4 -> σ(1) = 0.7311, σ(0) = 0.5, σ(-4) = 0.0180
    expected = [1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(4))]
    assert preference_probability(a, b, 0.1).tolist() == pytest.approx(expected)
    # T = 0: the better score wins outright; equal scores stay at 0.5
    assert preference_probability(a, b, 0.0).tolist() == [1.0, 0.5, 0.0]


def test_annotator_temperature_zero_is_deterministic():
    annotator = BradleyTerryAnnotator(VaderJudge(), temperature=0.0)
    calls = [annotator.compare(["p1", "p2"], [POSITIVE, NEGATIVE], [NEGATIVE, POSITIVE]) for _ in range(3)]
    assert all([p.chosen for p in prefs] == [POSITIVE, POSITIVE] for prefs in calls)  # same answer on every call
    first, second = calls[0]
    assert (first.a_chosen, second.a_chosen) == (True, False)
    assert first.chosen == POSITIVE and first.rejected == NEGATIVE and first.prompt == "p1"
    assert first.probability == 1.0 and not first.tie and first.outcome == 1.0 and second.outcome == 0.0
    assert first.margin == pytest.approx(first.score_chosen - first.score_rejected) and first.margin > 0
    assert first.to_dict()["margin"] == first.margin


def test_annotator_agreement_matches_bradley_terry_probability():
    # Gap Δ = 0.1 at T = 0.1: a is chosen with probability σ(1) = 0.7311. With 4000 labels the standard error is
    # sqrt(0.73 · 0.27 / 4000) = 0.007, so a 0.03 band is over 4 standard errors wide.
    n = 4000
    annotator = BradleyTerryAnnotator(number_judge, temperature=0.1, seed=0)
    prefs = annotator.compare(["p"] * n, ["0.3"] * n, ["0.2"] * n)
    agreement = sum(p.a_chosen for p in prefs) / n
    assert agreement == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)
    # the probability is stated for the chosen side: σ(1) when it agrees with the judge, 1 − σ(1) when not
    flipped = next(p for p in prefs if not p.a_chosen)
    assert flipped.probability == pytest.approx(1 / (1 + math.exp(1))) and flipped.margin == pytest.approx(-0.1)

    # a fixed seed reproduces the labels; a different seed gives different ones
    again = BradleyTerryAnnotator(number_judge, temperature=0.1, seed=0).compare(["p"] * n, ["0.3"] * n, ["0.2"] * n)
    other = BradleyTerryAnnotator(number_judge, temperature=0.1, seed=1).compare(["p"] * n, ["0.3"] * n, ["0.2"] * n)
    assert [p.a_chosen for p in again] == [p.a_chosen for p in prefs]
    assert [p.a_chosen for p in other] != [p.a_chosen for p in prefs]


def test_annotator_ties_are_flagged_coin_flips():
    n = 2000
    annotator = BradleyTerryAnnotator(number_judge, temperature=0.0, tie_margin=0.05, seed=0)
    # gap 0.04 is within the tie margin, so even at T = 0 the label is a fair coin
    prefs = annotator.compare(["p"] * n, ["0.54"] * n, ["0.5"] * n)
    assert all(p.tie and p.outcome == 0.5 and p.probability == 0.5 for p in prefs)
    assert sum(p.a_chosen for p in prefs) / n == pytest.approx(0.5, abs=0.05)
    assert not annotator.compare(["p"], ["0.6"], ["0.5"])[0].tie


def test_annotator_rejects_bad_input():
    annotator = BradleyTerryAnnotator(number_judge, temperature=0.0)
    with pytest.raises(ValueError, match="same length"):
        annotator.compare(["p"], ["1", "2"], ["3"])
    assert annotator.compare([], [], []) == []
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        judge_scores(lambda p, c: [0.0], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="temperature"):
        BradleyTerryAnnotator(number_judge, temperature=-1.0)


def test_annotator_builds_from_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(BradleyTerryAnnotator, "annotator")
    cfg = parser.parse_args(
        ["--annotator.judge", '{"class_path": "lit_rlhf.judges.VaderJudge"}', "--annotator.temperature", "0.2"]
    )
    annotator = parser.instantiate(cfg).annotator
    assert isinstance(annotator.judge, VaderJudge) and annotator.temperature == 0.2
    assert len(annotator.compare(["p"], [POSITIVE], [NEGATIVE])) == 1
