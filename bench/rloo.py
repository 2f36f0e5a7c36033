"""RLOO as a ``PolicyOptimizer``, the example class of docs/new-algorithm.md, importable by the benchmarks."""

from __future__ import annotations

import torch

from lit_rlhf.rl.advantages import masked_mean
from lit_rlhf.rl.losses import policy_gradient_loss
from lit_rlhf.rl.optimizers import Experience, PolicyOptimizer, PolicyOutputs


class RLOO(PolicyOptimizer):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740): no critic; each completion's baseline is
    the mean return of the other completions of the same prompt (``generation.num_samples`` >= 2).

    Args:
        entropy_coef: Weight of the entropy bonus.
    """

    def __init__(self, entropy_coef: float = 0.0) -> None:
        self.entropy_coef = entropy_coef

    def advantages(self, experience: Experience) -> tuple[torch.Tensor, None]:
        returns = experience.rewards.sum(-1)  # (B,) score - β·KL of each completion
        group = experience.group
        counts = torch.bincount(group).to(returns.dtype)
        if (counts < 2).any():
            raise ValueError("RLOO needs at least 2 completions per prompt: set model.generation.num_samples >= 2.")
        totals = returns.new_zeros(len(counts)).index_add(0, group, returns)
        baseline = (totals[group] - returns) / (counts[group] - 1)
        return (returns - baseline).unsqueeze(-1) * experience.response_mask, None

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_loss = policy_gradient_loss(outputs.logprobs, batch.advantages, batch.response_mask)
        entropy = masked_mean(outputs.entropy, batch.response_mask)
        loss = policy_loss - self.entropy_coef * entropy
        return loss, {"policy/loss": policy_loss.detach(), "policy/entropy": entropy.detach()}
