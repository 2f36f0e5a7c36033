"""K-wise ranking losses for reward models: InstructGPT's pairwise Bradley–Terry loss over every comparison of a prompt,
the Plackett–Luce likelihood of the whole ranking, and the comparison masks they share.

A batch holds B prompts with up to K responses each: ``rewards`` and ``scores`` (higher is better) are (B, K) and
``mask`` marks the slots that hold a response, so prompts with fewer responses are padded. Two responses are compared
when both are present and their scores differ; equal scores are a tie and never compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def comparisons(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Which response beats which: ``better[b, i, j]`` is True when slots i and j of row b both hold a response and
    ``scores[b, i] > scores[b, j]``.

    Shape: scores (B, K), mask (B, K) bool -> (B, K, K) bool.
    """
    present = mask[:, :, None] & mask[:, None, :]
    return present & (scores[:, :, None] > scores[:, None, :])


def _mean_over_compared(per_row: torch.Tensor, compared: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` over the rows that hold at least one comparison (a row without any carries no preference);
    0 when none does. Shape: per_row (B,), compared (B,) bool -> scalar."""
    return (per_row * compared).sum() / compared.sum().clamp(min=1)


def pairwise_ranking_loss(
    rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """InstructGPT's reward-model loss (Ouyang et al. 2022, sec. 3.5, eq. 1): for each prompt, the mean over its
    comparisons (y_w scored above y_l) of ``−log σ(r(x, y_w) − r(x, y_l) − m)``, then the mean over prompts.

    Dividing by the prompt's number of comparisons (C(K, 2) for a ranking without ties) keeps a prompt with nine
    responses from weighing 36 times as much as a pair. A row with two responses is one Bradley–Terry pair, so a batch
    of pairs gives ``bradley_terry_loss``. ``margin`` (a pair's Llama-2 margin) is subtracted from every comparison of
    its row.

    Shape: rewards (B, K), scores (B, K), mask (B, K) bool, margin (B,) or None -> scalar.
    """
    better = comparisons(scores, mask)
    diff = rewards[:, :, None] - rewards[:, None, :]
    if margin is not None:
        diff = diff - margin[:, None, None]
    count = better.sum(dim=(1, 2))
    per_row = (-F.logsigmoid(diff) * better).sum(dim=(1, 2)) / count.clamp(min=1)
    return _mean_over_compared(per_row, count > 0)


def plackett_luce_loss(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each prompt's ranking under the Plackett–Luce model (Luce 1959; Plackett 1975), mean
    over prompts: ``−Σ_{i=1..K−1} [r_π(i) − log Σ_{j≥i} exp r_π(j)]`` with π the responses best first.

    The ranking is read as successive choices: the best response is picked from all K, the second from the remaining
    K − 1, and so on. With ties, a response is picked from itself and the responses scored strictly below it, so tied
    responses are never compared (as in :func:`pairwise_ranking_loss`); without ties this is the formula above. With
    K = 2 it is the Bradley–Terry loss. The sum grows with K: a prompt's ranking weighs as its K − 1 choices.

    Shape: rewards (B, K), scores (B, K), mask (B, K) bool -> scalar.
    """
    better = comparisons(scores, mask)
    # Each slot competes with itself (so a padding slot's term is r − r = 0) and the responses below it.
    eye = torch.eye(rewards.shape[1], dtype=torch.bool, device=rewards.device)
    pool = better | eye[None]
    log_denominator = rewards[:, None, :].expand_as(pool).masked_fill(~pool, float("-inf")).logsumexp(dim=-1)
    per_row = -((rewards - log_denominator) * mask).sum(dim=-1)
    return _mean_over_compared(per_row, better.any(dim=-1).any(dim=-1))


def ranking_centering(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-centering term of K responses (Eisenstein et al. 2023): per prompt the mean over its pairs of present
    responses of ``(r_i + r_j)^2``, then the mean over prompts; for a pair it is ``(r_c + r_r)^2``.

    Shape: rewards (B, K), mask (B, K) bool -> scalar.
    """
    upper = torch.triu(mask[:, :, None] & mask[:, None, :], diagonal=1)
    sums = (rewards[:, :, None] + rewards[:, None, :]) ** 2
    count = upper.sum(dim=(1, 2))
    return _mean_over_compared((sums * upper).sum(dim=(1, 2)) / count.clamp(min=1), count > 0)


def pair_differences(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``r_w − r_l`` of every comparison of the batch, for pair accuracy (share above 0) and the mean reward gap.

    Shape: rewards (B, K), scores (B, K), mask (B, K) bool -> (P,), P the batch's number of comparisons.
    """
    better = comparisons(scores, mask)
    return (rewards[:, :, None] - rewards[:, None, :])[better]
