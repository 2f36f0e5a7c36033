"""Rule-based rewards: callables ``(prompts, completions) -> Tensor (N,)`` for RL, pickable in YAML by class_path.

The learned reward is ``lit_rlhf.reward.RewardModel``, a callable with the same signature.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch

from lit_rlhf.hparams import Configurable

__all__ = ["CharacterShareReward", "KeywordReward", "LengthReward", "SentimentReward", "TokenShareReward"]

_WORD = re.compile(r"\w+(?:'\w+)?")


def _check(prompts: list[str], completions: list[str], name: str) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{name}: got {len(prompts)} prompts but {len(completions)} completions; pass one per row.")


def _scores(completions: list[str], fn: Callable[[str], float]) -> torch.Tensor:
    return torch.tensor([fn(text) for text in completions], dtype=torch.float32)


class CharacterShareReward(Configurable):
    """Share of the completion's characters that are among ``target`` (0 for an empty completion), in [0, 1].

    A reward a character-level policy can learn in seconds: the smoke test of the RL loop.

    Args:
        target: The characters that count (each character of the string counts on its own).
        ignore_whitespace: Leave whitespace out of the denominator.
    """

    def __init__(self, target: str = "a", ignore_whitespace: bool = False) -> None:
        if not target:
            raise ValueError("CharacterShareReward(target=''): give at least one character.")
        self.target = frozenset(target)
        self.ignore_whitespace = ignore_whitespace

    def _share(self, text: str) -> float:
        chars = [c for c in text if not (self.ignore_whitespace and c.isspace())]
        return sum(c in self.target for c in chars) / len(chars) if chars else 0.0

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        _check(prompts, completions, type(self).__name__)
        return _scores(completions, self._share)


class TokenShareReward(Configurable):
    """Share of the completion's words that are among ``words`` (0 for a completion without words), in [0, 1].

    Args:
        words: The words that count.
        lowercase: Compare case-insensitively.
    """

    def __init__(self, words: list[str], lowercase: bool = True) -> None:
        if not words:
            raise ValueError("TokenShareReward(words=[]): give at least one word.")
        self.lowercase = lowercase
        self.words = frozenset(w.lower() if lowercase else w for w in words)

    def _share(self, text: str) -> float:
        found = _WORD.findall(text.lower() if self.lowercase else text)
        return sum(w in self.words for w in found) / len(found) if found else 0.0

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        _check(prompts, completions, type(self).__name__)
        return _scores(completions, self._share)


class LengthReward(Configurable):
    """1 at the target length, falling linearly to 0 at a distance of ``target`` (or more): 1 - min(1, |n - t| / t).

    Args:
        target: The length to aim for.
        unit: Count ``words`` or ``chars``.
    """

    def __init__(self, target: int = 50, unit: Literal["words", "chars"] = "words") -> None:
        if target < 1:
            raise ValueError(f"LengthReward(target={target}): must be >= 1.")
        if unit not in ("words", "chars"):
            raise ValueError(f"LengthReward(unit={unit!r}): use 'words' or 'chars'.")
        self.target, self.unit = target, unit

    def _score(self, text: str) -> float:
        n = len(_WORD.findall(text)) if self.unit == "words" else len(text)
        return 1.0 - min(1.0, abs(n - self.target) / self.target)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        _check(prompts, completions, type(self).__name__)
        return _scores(completions, self._score)


class KeywordReward(Configurable):
    """Fraction of ``keywords`` that occur in the completion (as whole words), minus the fraction of ``banned``
    words that occur; in [-1, 1].

    Args:
        keywords: Words or phrases to reward.
        banned: Words or phrases to penalise.
        case_sensitive: Match case exactly.
    """

    def __init__(self, keywords: list[str], banned: list[str] | None = None, case_sensitive: bool = False) -> None:
        if not keywords and not banned:
            raise ValueError("KeywordReward: give keywords and/or banned words.")
        flags = 0 if case_sensitive else re.IGNORECASE
        self.keywords = [re.compile(rf"\b{re.escape(k)}\b", flags) for k in keywords]
        self.banned = [re.compile(rf"\b{re.escape(k)}\b", flags) for k in banned or []]

    def _score(self, text: str) -> float:
        found = sum(bool(p.search(text)) for p in self.keywords) / len(self.keywords) if self.keywords else 0.0
        bad = sum(bool(p.search(text)) for p in self.banned) / len(self.banned) if self.banned else 0.0
        return found - bad

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        _check(prompts, completions, type(self).__name__)
        return _scores(completions, self._score)


class SentimentReward(Configurable):
    """VADER's compound sentiment score of the completion, in [-1, 1] (Hutto & Gilbert 2014; ``vaderSentiment``).

    The prompt is ignored. The analyzer is built on first use and left out of pickles, so the reward copies cheaply
    to worker processes.

    Args:
        target: ``positive`` rewards positive text; ``negative`` flips the sign.
    """

    def __init__(self, target: Literal["positive", "negative"] = "positive") -> None:
        if target not in ("positive", "negative"):
            raise ValueError(f"SentimentReward(target={target!r}): use 'positive' or 'negative'.")
        self.sign = 1.0 if target == "positive" else -1.0
        self._analyzer = None

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Score each completion. Shape: (N,) float32."""
        _check(prompts, completions, type(self).__name__)
        if self._analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        return _scores(completions, lambda text: self.sign * self._analyzer.polarity_scores(text)["compound"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_analyzer": None}
