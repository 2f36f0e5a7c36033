"""The K-wise ranking row format (one prompt, K >= 2 responses, a ranking or scores; InstructGPT's comparisons):
``RankingExample`` and its parser, with errors that name the file, line and field at fault."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from statistics import fmean
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.chat import render_reply
from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.rows import PreferenceExample, parse_messages


@dataclass(frozen=True)
class RankingExample:
    """A prompt and its responses ordered by ``scores`` (higher is better), already rendered as text.

    Every two responses with different scores are a comparison; responses with equal scores are a tie, not compared.
    A ``ranking`` row ``[best, …, worst]`` of K responses gives the scores K − 1 (best) … 0 (worst).
    """

    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    margin: float = 0.0
    """Only for a pair read from a file that also holds rankings (:func:`ranking_from_pair`): its margin, which the
    pairwise loss subtracts from the comparison. Ranking rows have none."""

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """``(better, worse)`` response indices of every comparison."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(k) if self.scores[i] > self.scores[j]]

    @property
    def ranking(self) -> list[int]:
        """Response indices best first (tied responses in their order in the row)."""
        return sorted(range(len(self.responses)), key=lambda i: -self.scores[i])


def is_ranking_row(row: Mapping[str, Any]) -> bool:
    """A row in the ranking format: it has ``responses`` (pair rows have ``chosen`` / ``rejected``)."""
    return row.get("responses") is not None


def ranking_from_pair(pair: PreferenceExample) -> RankingExample:
    """A pair as a ranking of two: chosen scored 1, rejected 0, its margin kept."""
    return RankingExample(pair.prompt, (pair.chosen, pair.rejected), (1.0, 0.0), pair.margin)


def parse_ranking_row(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    file: str = "<input>",
    line: int = 0,
    counts: Counter | None = None,
) -> RankingExample:
    """Parse one ranking row: ``prompt``, ``responses`` (K >= 2) and exactly one of

    - ``ranking``: response indices (0-based) best first, each index once: ``[2, 0, 1]`` says response 2 is best;
    - ``scores``: one finite number per response, higher is better; equal scores are ties, not compared.

    ``prompt`` and ``responses`` are text, or (conversational) ``prompt`` a message list and each response a message
    list, one message, or text taken as the assistant reply, rendered with the tokenizer's chat template as in
    :func:`~lit_rlhf.data.rows.parse_preference_row`. Responses with the same text are merged into one scored with
    the mean of their scores (``counts["merged"]`` counts the copies removed).

    Args:
        row: The decoded row.
        tokenizer: Supplies the chat template for conversational rows; None renders them as ``"role: content"``.
        file: Source name for errors.
        line: Line (or row number) for errors.
        counts: If given, ``counts["merged"]`` is incremented per response merged into an identical one.

    Raises:
        DataFormatError: naming the file, line and field at fault.
    """
    for field in ("chosen", "rejected", "margin"):
        if row.get(field) is not None:
            raise DataFormatError(
                file, line, field, "a ranking row (one with responses) takes no chosen, rejected or margin"
            )
    responses = row["responses"]
    if not isinstance(responses, Sequence) or isinstance(responses, str):
        raise DataFormatError(file, line, "responses", f"expected a list of responses, got {type(responses).__name__}")
    k = len(responses)
    if k < 2:
        raise DataFormatError(file, line, "responses", f"a ranking needs at least 2 responses, got {k}")
    prompt, texts = _render(row.get("prompt"), responses, tokenizer, file, line)
    has_ranking, has_scores = row.get("ranking") is not None, row.get("scores") is not None
    if has_ranking and has_scores:
        raise DataFormatError(file, line, "scores", "give either ranking or scores, not both")
    if has_ranking:
        scores = _ranking_scores(row["ranking"], k, file, line)
    elif has_scores:
        scores = _scores(row["scores"], k, file, line)
    else:
        raise DataFormatError(file, line, "ranking", "missing: give ranking (indices best first) or scores")
    merged: dict[str, list[float]] = {}
    for text, score in zip(texts, scores, strict=True):
        merged.setdefault(text, []).append(score)
    if counts is not None:
        counts["merged"] += k - len(merged)
    return RankingExample(prompt, tuple(merged), tuple(fmean(group) for group in merged.values()))


def _render(
    prompt: Any, responses: Sequence[Any], tokenizer: PreTrainedTokenizerBase | None, file: str, line: int
) -> tuple[str, list[str]]:
    """The prompt and response texts of a ranking row, conversational ones rendered with the chat template."""
    if prompt is None:
        raise DataFormatError(file, line, "prompt", "missing (ranking rows give the prompt apart from the responses)")
    if isinstance(prompt, str):
        for i, response in enumerate(responses):
            if not isinstance(response, str):
                reason = f"prompt is text, so responses must be too (got {type(response).__name__})"
                raise DataFormatError(file, line, f"responses[{i}]", reason)
        return prompt, list(responses)
    if not isinstance(prompt, (Mapping, Sequence)):
        raise DataFormatError(file, line, "prompt", f"expected text or messages, got {type(prompt).__name__}")
    context = parse_messages(prompt, "prompt", file, line)
    head, texts = "", []
    for i, response in enumerate(responses):
        field = f"responses[{i}]"
        if isinstance(response, str):
            reply = [{"role": "assistant", "content": response}]
        else:
            reply = parse_messages(response, field, file, line)
        head, text = render_reply(context, reply, tokenizer, file, line, field)
        texts.append(text)
    return head, texts


def _ranking_scores(ranking: Any, k: int, file: str, line: int) -> list[float]:
    """Scores K − 1 … 0 from a full ranking (indices best first), checked to name each response exactly once."""
    if not isinstance(ranking, Sequence) or isinstance(ranking, str):
        kind = type(ranking).__name__
        raise DataFormatError(file, line, "ranking", f"expected a list of response indices, got {kind}")
    if len(ranking) != k:
        raise DataFormatError(file, line, "ranking", f"has {len(ranking)} indices for {k} responses; rank every one")
    scores: list[float | None] = [None] * k
    for position, index in enumerate(ranking):
        field = f"ranking[{position}]"
        if not isinstance(index, Integral) or isinstance(index, bool):
            raise DataFormatError(file, line, field, f"expected a response index, got {index!r}")
        if not 0 <= index < k:
            raise DataFormatError(file, line, field, f"index {index} is out of range for {k} responses (0 to {k - 1})")
        if scores[index] is not None:
            raise DataFormatError(file, line, field, f"index {index} appears twice; rank each response once")
        scores[index] = float(k - 1 - position)
    return scores  # type: ignore[return-value]  # all k set: k distinct indices in range


def _scores(values: Any, k: int, file: str, line: int) -> list[float]:
    """One finite number per response."""
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise DataFormatError(file, line, "scores", f"expected a list of numbers, got {type(values).__name__}")
    if len(values) != k:
        raise DataFormatError(file, line, "scores", f"has {len(values)} scores for {k} responses; score every one")
    scores = []
    for i, value in enumerate(values):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise DataFormatError(file, line, f"scores[{i}]", f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise DataFormatError(file, line, f"scores[{i}]", f"must be finite, got {value!r}")
        scores.append(float(value))
    return scores
