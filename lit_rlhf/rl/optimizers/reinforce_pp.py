"""REINFORCE++ (Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward
Models", arXiv 2501.03262): no critic; token-level returns of the KL-penalised reward, normalised over the whole
batch (not per prompt), in PPO's clipped surrogate."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lit_rlhf.rl.advantages import discounted_returns, global_whiten, group_normalized, masked_mean
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.losses import clipped_policy_loss
from lit_rlhf.rl.optimizers.base import PolicyOptimizer, UpdateSchedule
from lit_rlhf.rl.scoring import kl_penalized_rewards


class ReinforcePP(PolicyOptimizer):
    """REINFORCE++: the per-token rewards r_t = −β·kl_t (+ the score on the last token) summed into returns
    G_t = Σ_{s≥t} γ^{s−t} r_s, whitened over every response token of the batch on every process, as the advantage
    of PPO's clipped surrogate (Hu 2025, eqs. 5–8). With ``baseline: group`` (REINFORCE++-baseline, for several
    samples per prompt) the mean score of the prompt's completions is subtracted from each score first.

    Works with one sample per prompt (``baseline: none``); ``group`` needs ``generation.num_samples`` >= 2.

    Args:
        epochs: Passes over each rollout.
        num_minibatches: Optimizer steps per pass; the rollout rows are split into this many shuffled minibatches.
        clip_range: ε: the ratio π/π_old is clipped to [1-ε, 1+ε].
        gamma: Discount per token.
        baseline: ``none`` (REINFORCE++) or ``group`` (REINFORCE++-baseline: the prompt's mean score subtracted).
        entropy_coef: Weight of the entropy bonus (subtracted from the loss).
        target_kl: Stop the iteration's update once a minibatch's approximate KL exceeds this; None never stops.
    """

    def __init__(
        self,
        epochs: int = 1,
        num_minibatches: int = 1,
        clip_range: float = 0.2,
        gamma: float = 1.0,
        baseline: Literal["none", "group"] = "none",
        entropy_coef: float = 0.0,
        target_kl: float | None = None,
    ) -> None:
        if clip_range <= 0:
            raise ValueError(f"ReinforcePP: clip_range must be > 0, got {clip_range}.")
        if baseline not in ("none", "group"):
            raise ValueError(f"ReinforcePP: baseline must be 'none' or 'group', got {baseline!r}.")
        self.schedule = UpdateSchedule(epochs, num_minibatches, target_kl)
        self.clip_range, self.gamma, self.baseline, self.entropy_coef = clip_range, gamma, baseline, entropy_coef
        self.min_samples = 2 if baseline == "group" else 1

    def advantages(self, experience: Experience) -> tuple[Tensor, None]:
        e = experience
        rewards = e.rewards
        if self.baseline == "group":  # each score minus its prompt's mean score, before the KL penalty
            centred = group_normalized(e.scores, e.group, scale="none")
            rewards = kl_penalized_rewards(centred, e.kl, e.response_mask, e.kl_coef)
        returns = discounted_returns(rewards, e.response_mask, self.gamma)
        return global_whiten(returns, e.response_mask), None

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        policy_loss, clip_frac = clipped_policy_loss(
            outputs.logprobs, batch.logprobs, batch.advantages, mask, self.clip_range
        )
        entropy = masked_mean(outputs.entropy, mask)
        return policy_loss - self.entropy_coef * entropy, {
            "policy/loss": policy_loss.detach(),
            "policy/clip_frac": clip_frac,
            "policy/entropy": entropy.detach(),
        }
