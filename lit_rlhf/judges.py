"""Simulated annotators that stand in for humans: a gold sentiment judge and a noisy Bradley–Terry labeller."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lit_rlhf.hparams import Configurable
from lit_rlhf.rewards import SentimentReward

__all__ = ["BradleyTerryAnnotator", "Judge", "Preference", "VaderJudge", "judge_scores", "preference_probability"]


class Judge(Protocol):
    """Anything that scores completions: ``judge(prompts, completions)`` -> tensor or list of N floats.

    The same contract as a reward function, so a reward model, a rule, a plain function or a ``VaderJudge`` all fit.
    In YAML give a ``class_path`` (with ``init_args``) or the import path of a function.
    """

    def __call__(self, prompts: Any, completions: Any, /) -> Any: ...


def judge_scores(judge: Judge, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """Call ``judge`` and check that it gave one finite score per completion.

    Returns:
        Scores as float64 on CPU. Shape: (N,).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; they must pair up one to one.")
    scores = torch.as_tensor(judge(list(prompts), list(completions))).detach().to("cpu", torch.float64).flatten()
    name = getattr(judge, "__name__", type(judge).__name__)
    if scores.numel() != len(completions):
        raise ValueError(f"judge {name} returned {scores.numel()} scores for {len(completions)} completions.")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"judge {name} returned non-finite scores: {scores.tolist()}.")
    return scores


class VaderJudge(SentimentReward):
    """Gold judge: VADER's compound sentiment of the completion, in [−1, 1] (``SentimentReward`` aimed at positive
    text), playing the "true human preference" in simulated-feedback runs: more positive text is better.

    Rule-based and deterministic. It has the signature of a reward, so it can also be the RL reward directly
    (``class_path: lit_rlhf.judges.VaderJudge``).
    """

    def __init__(self) -> None:
        super().__init__("positive")


def preference_probability(scores_a: torch.Tensor, scores_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(a ≻ b) = σ((s_a − s_b) / T), the Bradley–Terry choice model (Bradley & Terry, 1952) on judge scores.

    T = 0 is the noiseless limit: 1 where s_a > s_b, 0 where s_a < s_b, 0.5 on equal scores.

    Args:
        scores_a: Judge scores of the first completions. Shape: (N,).
        scores_b: Judge scores of the second completions. Shape: (N,).
        temperature: Noise scale T >= 0, in the judge's units: a score gap of T gives P ≈ 0.73.

    Returns:
        Probability that a is preferred. Shape: (N,).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    diff = scores_a - scores_b
    if temperature == 0:
        return 0.5 + 0.5 * torch.sign(diff)
    return torch.sigmoid(diff / temperature)


@dataclass(frozen=True)
class Preference:
    """One labelled pair.

    ``margin`` is ``score_chosen − score_rejected``; it is negative when the noisy annotator went against its judge,
    so clamp it at 0 before using it as a reward-model loss margin.
    """

    prompt: str
    """The prompt both completions answer."""
    chosen: str
    """The completion the annotator preferred."""
    rejected: str
    """The other completion."""
    score_chosen: float
    """Judge score of ``chosen``."""
    score_rejected: float
    """Judge score of ``rejected``."""
    probability: float
    """P(chosen ≻ rejected) under the annotator's model: below 0.5 when the sampled label disagrees with the judge."""
    a_chosen: bool
    """Whether the first completion (``completions_a``) was chosen."""
    tie: bool
    """The scores were within ``tie_margin``: the label is a fair coin and carries no information."""

    @property
    def margin(self) -> float:
        return self.score_chosen - self.score_rejected

    @property
    def outcome(self) -> float:
        """Result for completion a: 1 win, 0.5 tie, 0 loss (what ``WinRate`` and ``elo_ratings`` take)."""
        if self.tie:
            return 0.5
        return 1.0 if self.a_chosen else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The ``prompt``/``chosen``/``rejected``/``margin`` record of a plain preference file, plus label details."""
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "margin": self.margin,
            "score_chosen": self.score_chosen,
            "score_rejected": self.score_rejected,
            "probability": self.probability,
            "tie": self.tie,
        }


class BradleyTerryAnnotator(Configurable):
    """A simulated human labeller: prefers a over b with probability σ((s_a − s_b) / temperature).

    Scores come from any judge; sampling the label (rather than taking the better score) makes the annotator
    disagree with itself on close pairs, as human raters do (inter-annotator agreement in Ouyang et al., 2022 was
    about 73%). Pairs whose scores differ by at most ``tie_margin`` are ties: the label is a fair coin whatever the
    temperature, and ``Preference.tie`` is set so callers can drop them or count them as half a win.

    Args:
        judge: Scorer ``(prompts, completions) -> (N,)``: a class (``class_path``) or a function's import path.
        temperature: Label noise T in judge units; 0 labels by the higher score, deterministically.
        tie_margin: Largest absolute score difference treated as a tie.
        seed: Seed of the label sampler; the same seed and the same calls give the same labels.
    """

    def __init__(self, judge: Judge, temperature: float = 0.1, tie_margin: float = 0.0, seed: int = 0) -> None:
        if temperature < 0:
            raise ValueError(f"BradleyTerryAnnotator(temperature={temperature}): must be >= 0 (0 = deterministic).")
        if tie_margin < 0:
            raise ValueError(f"BradleyTerryAnnotator(tie_margin={tie_margin}): must be >= 0.")
        self.judge = judge
        self.temperature = temperature
        self.tie_margin = tie_margin
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def compare(
        self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str]
    ) -> list[Preference]:
        """Label each pair (prompt, a, b); one ``Preference`` per pair, in input order."""
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError(
                f"compare: {len(prompts)} prompts, {len(completions_a)} completions_a and {len(completions_b)} "
                "completions_b; they must have the same length."
            )
        n = len(prompts)
        if n == 0:
            return []
        # One judge call for both sides lets a batched reward model fill its batches.
        scores = judge_scores(self.judge, list(prompts) * 2, list(completions_a) + list(completions_b))
        score_a, score_b = scores[:n], scores[n:]
        tie = (score_a - score_b).abs() <= self.tie_margin
        p_a = preference_probability(score_a, score_b, self.temperature)
        p_a = torch.where(tie, torch.full_like(p_a, 0.5), p_a)
        # Always draw, even at T = 0, so that ties get their coin flip and the stream does not depend on T.
        a_chosen = torch.rand(n, generator=self._generator, dtype=torch.float64) < p_a

        preferences = []
        for i in range(n):
            first = bool(a_chosen[i])
            chosen, rejected = (completions_a[i], completions_b[i]) if first else (completions_b[i], completions_a[i])
            s_c, s_r = (score_a[i], score_b[i]) if first else (score_b[i], score_a[i])
            preferences.append(
                Preference(
                    prompt=prompts[i],
                    chosen=chosen,
                    rejected=rejected,
                    score_chosen=float(s_c),
                    score_rejected=float(s_r),
                    probability=float(p_a[i] if first else 1.0 - p_a[i]),
                    a_chosen=first,
                    tie=bool(tie[i]),
                )
            )
        return preferences
