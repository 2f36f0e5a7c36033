"""Advantage and return estimation over response tokens: GAE, discounted returns, masked whitening, group baselines."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
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


RewardScaling = Literal["group", "batch", "none"]


def group_counts(group: Tensor) -> Tensor:
    """Rows per prompt, at each row; fails when a prompt has fewer than two (no baseline from the others).

    Shape: group (B,) long -> (B,) float.
    """
    counts = torch.bincount(group).float()
    if (counts[group] < 2).any():
        raise ValueError("group baselines need at least 2 completions per prompt: set generation.num_samples >= 2.")
    return counts[group]


def group_normalized(returns: Tensor, group: Tensor, scale: RewardScaling = "group", eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2): Â_i = (R_i − mean_g R) / std,
    the mean over the completions of the same prompt; std is that group's (``group``, as the paper), the whole
    batch's (``batch``: group mean, batch std, Liu et al. 2025 "Part I: Tricks or Traps?") or 1 (``none``: Dr. GRPO,
    Liu et al. 2025, which finds the division favours prompts that are too easy or too hard). Standard deviations are
    the sample ones (n − 1); a group whose returns are all equal gets advantage 0.

    Shape: returns (B,), group (B,) long -> (B,).
    """
    counts = group_counts(group)
    totals = returns.new_zeros(int(group.max()) + 1).index_add(0, group, returns)
    centred = returns - totals[group] / counts
    if scale == "none":
        return centred
    if scale == "batch":
        return centred / (returns.std() + eps)
    if scale == "group":
        squares = returns.new_zeros(len(totals)).index_add(0, group, centred**2)
        return centred / ((squares[group] / (counts - 1)).sqrt() + eps)
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}.")


def global_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``whiten`` with the mean and variance of the masked positions across every process (one all-reduce when
    torch.distributed is initialised): REINFORCE++'s global-batch normalisation (Hu 2025, arXiv 2501.03262, sec. 3).

    Shape: (B, T), (B, T) -> (B, T).
    """
    moments = torch.stack([(values * mask).sum(), (values**2 * mask).sum(), mask.sum()]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(moments)
    total, squares, count = moments.unbind()
    mean = total / count.clamp(min=1)
    var = (squares / count.clamp(min=1) - mean**2).clamp(min=0)
    return ((values - mean.to(values.dtype)) * torch.rsqrt(var.to(values.dtype) + eps)) * mask
