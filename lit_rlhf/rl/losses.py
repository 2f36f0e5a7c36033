"""Policy-gradient and value losses on response tokens: PPO's clipped surrogate and value loss, plain A2C terms,
and the ways to average per-token terms into a loss."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_rlhf.rl.advantages import masked_mean
from lit_rlhf.rl.kl import kl_k3


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7), as
    a loss: max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) with ρ = π(y_t) / π_old(y_t), before any averaging.

    Shape: logprobs (B, T), old_logprobs (B, T), advantages (B, T) -> loss (B, T), clipped (B, T) bool (where the
    clipped term is the active one).
    """
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """``clipped_surrogate`` averaged over all response tokens of the batch.

    Shape: logprobs (B, T), old_logprobs (B, T), advantages (B, T), mask (B, T) -> loss (), clip fraction ()
    (share of tokens where the clipped term is the active one).
    """
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range)
    return masked_mean(per_token, mask), masked_mean(clipped.float(), mask)


LossAggregation = Literal["sequence", "token", "constant"]


def aggregate(per_token: Tensor, mask: Tensor, aggregation: LossAggregation, length: int | None = None) -> Tensor:
    """Reduce per-token loss terms to one number, in one of the ways the GRPO family does:

    - ``sequence``: mean over each response's tokens, then over responses, 1/G Σ_i 1/|o_i| Σ_t (GRPO, Shao et al.
      2024, eq. 3): every response weighs the same, so a token of a short response weighs more than one of a long;
    - ``token``: sum over every response token of the batch / their number (DAPO, Yu et al. 2025, eq. 8);
    - ``constant``: sum over every response token / (B · L) with a constant L (Dr. GRPO, Liu et al. 2025,
      "Understanding R1-Zero-Like Training"): no length normalisation, hence no bias towards long wrong answers.
      L is ``length``; None uses T, the rollout's padded response length.

    Shape: per_token (B, T), mask (B, T) -> ().
    """
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=-1).mean()
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "constant":
        return (per_token * mask).sum() / (per_token.shape[0] * (length or per_token.shape[1]))
    raise ValueError(f"loss aggregation must be 'sequence', 'token' or 'constant', got {aggregation!r}.")


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss: ½·mean of max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±ε).

    Shape: values (B, T), old_values (B, T), returns (B, T), mask (B, T) -> loss (), clip fraction ().
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_frac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_frac


def policy_gradient_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """The REINFORCE / A2C loss -mean(A_t·log π(y_t)) over response tokens (Williams 1992; Mnih et al. 2016).

    Shape: logprobs (B, T), advantages (B, T), mask (B, T) -> ().
    """
    return -masked_mean(advantages.detach() * logprobs, mask)


def value_loss(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """½·mean of (V - R)² over response tokens. Shape: (B, T), (B, T), (B, T) -> ()."""
    return 0.5 * masked_mean((values - returns.detach()) ** 2, mask)


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL[π_old‖π] on the sampled tokens with the k3 estimator (joschu.net/blog/kl-approx.html): (ρ - 1) - log ρ.

    Shape: logprobs (B, T), old_logprobs (B, T), mask (B, T) -> ().
    """
    return masked_mean(kl_k3(old_logprobs, logprobs), mask)
