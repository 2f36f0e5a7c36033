"""RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740): no critic, each
completion's baseline is the mean return of the other completions of its prompt. docs/new-algorithm.md walks
through this file as the example of a new algorithm."""

from __future__ import annotations

import torch

from lit_rlhf.rl.advantages import masked_mean
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.losses import policy_gradient_loss
from lit_rlhf.rl.optimizers.base import PolicyOptimizer


class RLOO(PolicyOptimizer):
    """REINFORCE Leave-One-Out: the return R_i = score − β·KL of each of a prompt's k completions, minus the mean
    return of the other k − 1, b_i = (Σ_j R_j − R_i) / (k − 1), weights the log-probs of all its tokens.

    Needs ``generation.num_samples`` >= 2; one optimizer step per rollout.

    Args:
        entropy_coef: Weight of the entropy bonus (subtracted from the loss).
    """

    min_samples = 2

    def __init__(self, entropy_coef: float = 0.0) -> None:
        self.entropy_coef = entropy_coef

    def advantages(self, experience: Experience) -> tuple[torch.Tensor, None]:
        returns = experience.rewards.sum(-1)  # (B,) score − β·KL of each completion
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
