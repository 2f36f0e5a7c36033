"""PPO (Schulman et al. 2017) for language models: GAE advantages, clipped surrogate and clipped value loss."""

from __future__ import annotations

from torch import Tensor

from lit_rlhf.rl.advantages import gae_advantages, masked_mean
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.losses import clipped_policy_loss, clipped_value_loss
from lit_rlhf.rl.optimizers.base import PolicyOptimizer, UpdateSchedule


class PPO(PolicyOptimizer):
    """Proximal Policy Optimization with a critic, as in Ziegler et al. 2019 / Ouyang et al. 2022.

    Args:
        epochs: Passes over each rollout.
        num_minibatches: Optimizer steps per pass; the rollout rows are split into this many shuffled minibatches.
        clip_range: ε of the clipped surrogate: the ratio π/π_old is clipped to [1-ε, 1+ε].
        clip_range_value: How far new values may move from the rollout's values before the value loss is clipped.
        value_coef: Weight of the value loss in the total loss.
        entropy_coef: Weight of the entropy bonus (subtracted from the loss).
        gamma: Discount per token.
        lam: GAE λ: 1 gives Monte-Carlo advantages, 0 one-step TD.
        whiten_advantages: Normalise advantages to zero mean, unit variance over the rollout's response tokens.
        target_kl: Stop the iteration's update once a minibatch's approximate KL exceeds this; None never stops.
    """

    needs_critic = True

    def __init__(
        self,
        epochs: int = 4,
        num_minibatches: int = 1,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        value_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        target_kl: float | None = None,
    ) -> None:
        if clip_range <= 0 or clip_range_value <= 0:
            raise ValueError(f"PPO: clip_range ({clip_range}) and clip_range_value ({clip_range_value}) must be > 0.")
        self.schedule = UpdateSchedule(epochs, num_minibatches, target_kl)
        self.clip_range, self.clip_range_value = clip_range, clip_range_value
        self.value_coef, self.entropy_coef = value_coef, entropy_coef
        self.gamma, self.lam, self.whiten_advantages = gamma, lam, whiten_advantages

    def advantages(self, experience: Experience) -> tuple[Tensor, Tensor]:
        e = experience
        return gae_advantages(e.rewards, e.values, e.response_mask, self.gamma, self.lam, self.whiten_advantages)

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        policy_loss, clip_frac = clipped_policy_loss(
            outputs.logprobs, batch.logprobs, batch.advantages, mask, self.clip_range
        )
        critic_loss, value_clip_frac = clipped_value_loss(
            outputs.values, batch.values, batch.returns, mask, self.clip_range_value
        )
        entropy = masked_mean(outputs.entropy, mask)
        loss = policy_loss + self.value_coef * critic_loss - self.entropy_coef * entropy
        return loss, {
            "policy/loss": policy_loss.detach(),
            "policy/clip_frac": clip_frac,
            "policy/entropy": entropy.detach(),
            "value/loss": critic_loss.detach(),
            "value/clip_frac": value_clip_frac,
        }
