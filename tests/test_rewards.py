"""Rule-based reward callables on hand-checked texts."""

import pytest
import torch

from lit_rlhf.rewards import CharacterShareReward, KeywordReward, LengthReward, SentimentReward, TokenShareReward


def scores(reward, completions):
    out = reward(["prompt"] * len(completions), completions)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (len(completions),)
    return out.tolist()


def test_character_share():
    # "aab": 2 of 3 characters are "a"; "" has none; "a b": 1 of 3, or 1 of 2 without whitespace
    assert scores(CharacterShareReward("a"), ["aab", "", "a b"]) == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert scores(CharacterShareReward("a", ignore_whitespace=True), ["a b"]) == pytest.approx([0.5])
    assert scores(CharacterShareReward("ab"), ["abc"]) == pytest.approx([2 / 3])


def test_token_share():
    # words: good, job, good -> 2 of 3 (case-insensitive); no words -> 0
    assert scores(TokenShareReward(["good"]), ["Good job, good!", "..."]) == pytest.approx([2 / 3, 0.0])
    assert scores(TokenShareReward(["good"], lowercase=False), ["Good good"]) == pytest.approx([0.5])


def test_length():
    # target 4 chars: 4 -> 1; 2 -> 1 - 2/4 = 0.5; 10 -> 1 - min(1, 6/4) = 0
    assert scores(LengthReward(4, unit="chars"), ["abcd", "ab", "abcdefghij"]) == pytest.approx([1.0, 0.5, 0.0])
    assert scores(LengthReward(2, unit="words"), ["one two", "one"]) == pytest.approx([1.0, 0.5])


def test_keywords():
    reward = KeywordReward(["cat", "dog"], banned=["bad"])
    # both keywords and the banned word: 1 - 1 = 0; one keyword: 0.5; "cats" is not the word "cat"
    assert scores(reward, ["A cat and a bad dog", "CAT", "cats"]) == pytest.approx([0.0, 0.5, 0.0])


def test_sentiment():
    positive, negative = SentimentReward(), SentimentReward("negative")
    good, bad = scores(positive, ["I love this, it is wonderful!", "This is terrible and awful."])
    assert good > 0.5 and bad < -0.5
    assert scores(negative, ["I love this, it is wonderful!"]) == pytest.approx([-good])


def test_rewards_check_their_input():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        CharacterShareReward()(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="target"):
        CharacterShareReward("")
    with pytest.raises(ValueError, match="positive"):
        SentimentReward("neutral")
