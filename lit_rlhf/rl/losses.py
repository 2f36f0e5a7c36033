"""Policy-gradient and value losses on response tokens: PPO's clipped surrogate and value loss, plain A2C terms."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.rl.advantages import masked_mean
from lit_rlhf.rl.kl import kl_k3


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7), as a loss:
    mean over tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) with ρ = π(y_t) / π_old(y_t).

    Shape: logprobs (B, T), old_logprobs (B, T), advantages (B, T), mask (B, T) -> loss (), clip fraction ()
    (share of tokens where the clipped term is the active one).
    """
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


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
