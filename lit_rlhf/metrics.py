"""Evaluation metrics for generated text and policies: distinct-n, win rate, perplexity and Elo-scale ratings.

Means of scalars (reward, KL, length) need nothing new: use ``torchmetrics.MeanMetric``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["DistinctN", "WinRate", "distinct_n", "elo_ratings", "expected_score", "ngrams", "sequence_perplexity"]


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams of ``text`` over whitespace tokens (``str.split()``); empty when it has fewer than ``n`` tokens."""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got n={n}.")
    tokens = text.split()
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _stable_hash(gram: tuple[str, ...]) -> int:
    # Python's hash() is salted per process, so ranks would disagree on the same n-gram; blake2b is not.
    digest = hashlib.blake2b("\x1f".join(gram).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n of a corpus: unique n-grams / total n-grams, pooled over all texts (Li et al., 2016).

    Li et al. ("A Diversity-Promoting Objective Function for Neural Conversation Models", NAACL 2016) divide by the
    number of generated tokens; dividing by the number of n-grams, as here, keeps the value in [0, 1] for every n.
    Returns 0.0 when the texts hold no n-gram at all.
    """
    total, unique = 0, set()
    for text in texts:
        grams = ngrams(text, n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


class DistinctN(Metric):
    """Distinct-n (Li et al., 2016) accumulated over batches and ranks: unique n-grams / total n-grams.

    N-grams are taken over whitespace tokens and pooled over every text seen, so repeating the same phrase in two
    batches (or on two ranks) counts once in the numerator. Each n-gram is kept as a 64-bit hash, so the state
    grows with the number of distinct n-grams per batch, not with the text length.

    Args:
        n: N-gram order: 1 for distinct-1, 2 for distinct-2.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, n: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"DistinctN(n={n}): the n-gram order must be >= 1.")
        self.n = n
        self.add_state("hashes", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str]) -> None:
        """Add a batch of generated texts."""
        if isinstance(texts, str):
            texts = [texts]
        grams = [gram for text in texts for gram in ngrams(text, self.n)]
        self.total += len(grams)
        if grams:
            hashes = torch.tensor([_stable_hash(gram) for gram in grams], dtype=torch.long, device=self.total.device)
            self.hashes.append(torch.unique(hashes))

    def compute(self) -> torch.Tensor:
        """Unique / total n-grams; 0.0 when no n-gram was seen."""
        if self.total.item() == 0:
            return torch.tensor(0.0, device=self.total.device)
        hashes = dim_zero_cat(self.hashes) if isinstance(self.hashes, list) else self.hashes
        return torch.unique(hashes).numel() / self.total.float()


class WinRate(Metric):
    """Win rate of a policy against a baseline: (wins + 0.5 · ties) / comparisons.

    ``update`` takes either per-comparison outcomes (1 = win, 0.5 = tie, 0 = loss; e.g. from a
    ``BradleyTerryAnnotator``) or two score tensors, in which case a comparison is a tie when the scores differ by at
    most ``tie_margin``.

    Args:
        tie_margin: Largest absolute score difference still counted as a tie when comparing scores.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, tie_margin: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if tie_margin < 0:
            raise ValueError(f"WinRate(tie_margin={tie_margin}): the margin must be >= 0.")
        self.tie_margin = tie_margin
        for name in ("wins", "ties", "losses"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor | Sequence[float], baseline_scores: torch.Tensor | None = None) -> None:
        """Add comparisons.

        Args:
            scores: Outcomes in {0, 0.5, 1} when ``baseline_scores`` is None, else the policy's scores.
                Shape: (N,).
            baseline_scores: The baseline's scores for the same N prompts. Shape: (N,).
        """
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
        if baseline_scores is None:
            valid = (scores == 0) | (scores == 0.5) | (scores == 1)
            if not bool(valid.all()):
                raise ValueError(
                    f"WinRate.update: outcomes must be 1 (win), 0.5 (tie) or 0 (loss), got {scores[~valid].tolist()}; "
                    "pass baseline_scores to compare raw scores."
                )
            wins, ties = scores == 1, scores == 0.5
        else:
            baseline = torch.as_tensor(baseline_scores, dtype=torch.float64).flatten()
            if baseline.shape != scores.shape:
                raise ValueError(f"WinRate.update: scores {tuple(scores.shape)} vs baseline {tuple(baseline.shape)}.")
            diff = scores - baseline
            ties = diff.abs() <= self.tie_margin
            wins = (diff > 0) & ~ties
        self.wins += int(wins.sum())
        self.ties += int(ties.sum())
        self.losses += int(scores.numel() - wins.sum() - ties.sum())

    def compute(self) -> torch.Tensor:
        """(wins + 0.5 · ties) / comparisons; NaN before any comparison."""
        total = self.wins + self.ties + self.losses
        if total.item() == 0:
            return torch.tensor(float("nan"))
        return (self.wins.double() + 0.5 * self.ties.double()) / total.double()


def sequence_perplexity(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence perplexity exp(−mean log p) over the masked tokens.

    Score responses with the reference model's log-probs to get "perplexity under the reference": a policy that
    drifts to text the reference finds unlikely shows a rising value. Rows with an empty mask give NaN.

    Args:
        logprobs: Log-probability of each realised token. Shape: (B, T).
        mask: 1 for tokens that count (the response), 0 for prompt and padding. Shape: (B, T).

    Returns:
        Perplexity per sequence. Shape: (B,).
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"sequence_perplexity: logprobs {tuple(logprobs.shape)} vs mask {tuple(mask.shape)}.")
    mask = mask.to(logprobs.dtype)
    count = mask.sum(dim=-1)
    nll = -(logprobs * mask).sum(dim=-1) / count
    return torch.exp(nll)


def _strongly_connected(players: list[str], beats: dict[str, set[str]]) -> bool:
    def reach(graph: dict[str, set[str]]) -> set[str]:
        seen, stack = {players[0]}, [players[0]]
        while stack:
            for other in graph[stack.pop()] - seen:
                seen.add(other)
                stack.append(other)
        return seen

    reverse: dict[str, set[str]] = {p: set() for p in players}
    for winner, losers in beats.items():
        for loser in losers:
            reverse[loser].add(winner)
    return len(reach(beats)) == len(players) and len(reach(reverse)) == len(players)


def elo_ratings(
    matches: Sequence[tuple[str, str, float]],
    *,
    initial: float = 1000.0,
    scale: float = 400.0,
    anchor: str | None = None,
    prior_draws: float = 0.0,
    max_iter: int = 10_000,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Elo-scale ratings by a Bradley–Terry maximum-likelihood fit to head-to-head results.

    Model: P(a beats b) = 1 / (1 + 10^(−(R_a − R_b) / scale)), the Elo expected score, i.e. Bradley–Terry
    (Bradley & Terry, 1952) with strengths γ = 10^(R / scale). A tie counts as half a win for each side. The fit uses
    Hunter's MM iteration (Hunter, "MM algorithms for generalized Bradley–Terry models", Ann. Statist. 2004):
    γ_i ← W_i / Σ_j n_ij / (γ_i + γ_j). Unlike sequential Elo updates with a K-factor, the result does not depend
    on the order of the matches.

    Ratings are only defined up to a shift, so they are pinned: ``anchor`` gets exactly ``initial``, or, without an
    anchor, the mean rating is ``initial``. The MLE is infinite when some group of players never loses (or never
    wins) to the rest; ``prior_draws`` > 0 then keeps it finite by giving every player that many virtual draws
    against a phantom of strength 1 (BayesElo's prior), which also shrinks ratings a little toward each other.

    Args:
        matches: ``(player_a, player_b, score_a)`` with ``score_a`` 1 (a won), 0.5 (tie) or 0 (b won); any value in
            [0, 1] is taken as a fractional win.
        initial: Rating of the anchor, or the mean rating without one.
        scale: Rating points per factor of 10 in the odds (400 in chess Elo).
        anchor: Player pinned to ``initial``.
        prior_draws: Virtual draws per player against a phantom; 0 for the plain MLE.
        max_iter: Iteration cap.
        tol: Stop when no log-strength moves by more than this.

    Returns:
        Rating per player.
    """
    if not matches:
        raise ValueError("elo_ratings: no matches given.")
    if prior_draws < 0:
        raise ValueError(f"elo_ratings: prior_draws must be >= 0, got {prior_draws}.")
    players: list[str] = []
    index: dict[str, int] = {}
    for row, (a, b, score) in enumerate(matches):
        if a == b:
            raise ValueError(f"elo_ratings: match {row} pits {a!r} against itself.")
        if not 0.0 <= float(score) <= 1.0:
            raise ValueError(
                f"elo_ratings: match {row} ({a!r} vs {b!r}) has score {score}, expected a value in [0, 1]."
            )
        for p in (a, b):
            if p not in index:
                index[p] = len(players)
                players.append(p)
    if anchor is not None and anchor not in index:
        raise ValueError(f"elo_ratings: anchor {anchor!r} played no match; players are {players}.")

    k = len(players)
    games = torch.zeros(k, k, dtype=torch.float64)  # games[i, j]: matches between i and j
    wins = torch.zeros(k, dtype=torch.float64)  # W_i: wins + 0.5 · ties
    beats: dict[str, set[str]] = {p: set() for p in players}
    for a, b, score in matches:
        i, j, s = index[a], index[b], float(score)
        games[i, j] += 1
        games[j, i] += 1
        wins[i] += s
        wins[j] += 1.0 - s
        if s > 0:
            beats[a].add(b)
        if s < 1:
            beats[b].add(a)
    if prior_draws == 0 and not _strongly_connected(players, beats):
        raise ValueError(
            "elo_ratings: the maximum-likelihood ratings are infinite because some players never lost (or never won) "
            "against the others, or the match graph is disconnected; pass prior_draws > 0 (e.g. 1.0)."
        )

    wins = wins + 0.5 * prior_draws
    gamma = torch.ones(k, dtype=torch.float64)
    for _ in range(max_iter):
        pair = games / (gamma[:, None] + gamma[None, :])
        denom = pair.sum(dim=1) + prior_draws / (gamma + 1.0)
        new = wins / denom
        if prior_draws == 0:
            new = new / torch.exp(torch.log(new).mean())  # the plain MLE is shift-invariant: fix the gauge
        done = torch.max(torch.abs(torch.log(new) - torch.log(gamma))).item() < tol
        gamma = new
        if done:
            break

    ratings = scale * torch.log10(gamma)
    shift = initial - (ratings[index[anchor]] if anchor is not None else ratings.mean())
    ratings = ratings + shift
    return {p: float(ratings[index[p]]) for p in players}


def expected_score(rating_a: float, rating_b: float, scale: float = 400.0) -> float:
    """Elo expected score of a against b: 1 / (1 + 10^((R_b − R_a) / scale))."""
    return 1.0 / (1.0 + math.pow(10.0, (rating_b - rating_a) / scale))
