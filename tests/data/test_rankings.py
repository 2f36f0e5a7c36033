"""The K-wise ranking row format (``lit_rlhf.data.rankings``): rankings and scores, conversational rows, merged
duplicates, pairs as rankings of two, and errors that name the file, line and field."""

import re
from collections import Counter

import pytest

from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.rankings import RankingExample, parse_ranking_row, ranking_from_pair
from lit_rlhf.data.rows import PreferenceExample


def test_ranking_becomes_scores_best_first():
    row = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}
    example = parse_ranking_row(row)
    # Best (response 2) gets K - 1 = 3, then 0 -> 2, 3 -> 1, 1 -> 0.
    assert example == RankingExample("p", ("a", "b", "c", "d"), (2.0, 0.0, 3.0, 1.0))
    assert example.ranking == [2, 0, 3, 1]
    assert len(example.pairs) == 6  # C(4, 2)
    assert (2, 1) in example.pairs and (1, 2) not in example.pairs


def test_scores_with_ties_leave_those_pairs_out():
    example = parse_ranking_row({"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.5, 2, 0.5]})
    assert example.scores == (0.5, 2.0, 0.5)
    assert sorted(example.pairs) == [(1, 0), (1, 2)]  # a and c tie
    assert example.ranking == [1, 0, 2]


def test_identical_responses_merge_with_their_mean_score():
    counts = Counter()
    row = {"prompt": "p", "responses": ["x", "y", "x"], "ranking": [0, 1, 2]}  # x is both best (2) and worst (0)
    example = parse_ranking_row(row, counts=counts)
    assert example == RankingExample("p", ("x", "y"), (1.0, 1.0))  # mean 1: tied with y, nothing to prefer
    assert example.pairs == [] and counts["merged"] == 1


def test_conversational_ranking_renders_each_reply(tok):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "responses": ["hello", [{"role": "assistant", "content": "go"}], {"role": "assistant", "content": "yo"}],
        "scores": [3, 1, 2],
    }
    example = parse_ranking_row(row, tok)
    assert example.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert example.responses == ("hello<|im_end|>\n", "go<|im_end|>\n", "yo<|im_end|>\n")


def test_a_pair_is_a_ranking_of_two():
    ranking = ranking_from_pair(PreferenceExample("p", "good", "bad", 0.5))
    assert ranking == RankingExample("p", ("good", "bad"), (1.0, 0.0), 0.5)
    assert ranking.pairs == [(0, 1)]


GOOD = {"prompt": "p", "responses": ["a", "b", "c"]}


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        (GOOD | {"ranking": [0, 1]}, "ranking", "has 2 indices for 3 responses"),
        (GOOD | {"ranking": [0, 1, 3]}, "ranking[2]", "index 3 is out of range for 3 responses"),
        (GOOD | {"ranking": [0, -1, 2]}, "ranking[1]", "index -1 is out of range"),
        (GOOD | {"ranking": [1, 0, 1]}, "ranking[2]", "index 1 appears twice"),
        (GOOD | {"ranking": [0, "1", 2]}, "ranking[1]", "expected a response index, got '1'"),
        (GOOD | {"ranking": [0, True, 2]}, "ranking[1]", "expected a response index, got True"),
        (GOOD | {"ranking": [0.0, 1, 2]}, "ranking[0]", "expected a response index, got 0.0"),
        (GOOD | {"ranking": "012"}, "ranking", "expected a list of response indices, got str"),
        (GOOD | {"scores": [1, 2]}, "scores", "has 2 scores for 3 responses"),
        (GOOD | {"scores": [1, float("nan"), 2]}, "scores[1]", "must be finite"),
        (GOOD | {"scores": [1, float("inf"), 2]}, "scores[1]", "must be finite"),
        (GOOD | {"scores": [1, "2", 3]}, "scores[1]", "expected a number, got '2'"),
        (GOOD | {"scores": [1, 2, 3], "ranking": [0, 1, 2]}, "scores", "give either ranking or scores, not both"),
        (GOOD, "ranking", "missing: give ranking"),
        ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "a ranking needs at least 2 responses"),
        ({"prompt": "p", "responses": "ab", "ranking": [0, 1]}, "responses", "expected a list of responses, got str"),
        ({"responses": ["a", "b"], "ranking": [0, 1]}, "prompt", "missing"),
        ({"prompt": 3, "responses": ["a", "b"], "ranking": [0, 1]}, "prompt", "expected text or messages, got int"),
        ({"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}, "responses[1]", "prompt is text, so responses"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", {"role": "assistant"}], "scores": [1, 0]},
            "responses[1][0].content",
            "missing or not text",
        ),
        (GOOD | {"ranking": [0, 1, 2], "margin": 1.0}, "margin", "a ranking row (one with responses) takes no"),
        (GOOD | {"ranking": [0, 1, 2], "chosen": "a"}, "chosen", "a ranking row (one with responses) takes no"),
    ],
)
def test_bad_fields_are_named(row, field, reason):
    with pytest.raises(DataFormatError, match=rf"^r.jsonl:9: field '{re.escape(field)}': {re.escape(reason)}"):
        parse_ranking_row(row, file="r.jsonl", line=9)
