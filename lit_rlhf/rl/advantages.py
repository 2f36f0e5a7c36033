"""Advantage and return estimation over response tokens: GAE, discounted returns, masked whitening."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the positions where ``mask`` is 1.

    Shape: (B, T), (B, T) -> scalar, or (B,) / (T,) along ``dim``.
    """
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance over the positions where ``mask`` is 1. Shape: (B, T), (B, T) -> scalar."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to unit variance (and zero mean when ``shift_mean``) over the masked positions; zero elsewhere.

    Shape: (B, T), (B, T) -> (B, T).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16): δ_t = r_t + γ·V_{t+1} - V_t, A_t = Σ_l (γλ)^l δ_{t+l}.

    The state after the last response token is terminal (V = 0); ``mask`` keeps a prefix of each row.

    Shape: rewards (B, T), values (B, T), mask (B, T) -> advantages (B, T), returns = advantages + values (B, T),
    both zero after the last response token.
    """
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, whiten_advantages: bool
) -> tuple[Tensor, Tensor]:
    """``gae`` followed, optionally, by masked whitening of the advantages (the returns stay raw value targets):
    what every actor-critic optimizer here (PPO, A2C, NLPO through PPO) does with a rollout.

    Shape: rewards, values, mask (B, T) -> advantages (B, T), returns (B, T).
    """
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return (whiten(advantages, mask) if whiten_advantages else advantages), returns


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go G_t = r_t + γ·G_{t+1}, with G = 0 after the last response token.

    Shape: rewards (B, T), mask (B, T) -> (B, T).
    """
    batch, length = rewards.shape
    returns = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_mask * running
        returns[:, t] = running
    return returns * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over masked positions: 1 is a perfect critic, 0 predicts the mean,
    negative is worse than the mean; nan when the returns do not vary.

    Shape: (B, T), (B, T), (B, T) -> scalar.
    """
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return torch.tensor(float("nan"), device=values.device)
    return 1 - masked_var(returns - values, mask) / var_returns
