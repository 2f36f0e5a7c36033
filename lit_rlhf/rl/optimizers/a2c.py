"""A2C (Mnih et al. 2016) for language models: one pass, advantage-weighted log-prob loss, value loss, entropy bonus."""

from __future__ import annotations

from torch import Tensor

from lit_rlhf.rl.advantages import gae_advantages, masked_mean
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.losses import policy_gradient_loss, value_loss
from lit_rlhf.rl.optimizers.base import PolicyOptimizer


class A2C(PolicyOptimizer):
    """Synchronous advantage actor-critic: each rollout is used once, in one optimizer step, with no ratio or
    clipping, so the update is the plain policy gradient with a learned baseline.

    Args:
        value_coef: Weight of the value loss in the total loss.
        entropy_coef: Weight of the entropy bonus (subtracted from the loss).
        gamma: Discount per token.
        lam: GAE λ of the advantage estimate (1.0: Monte-Carlo return minus the critic's value).
        whiten_advantages: Normalise advantages to zero mean, unit variance over the rollout's response tokens.
    """

    needs_critic = True

    def __init__(
        self,
        value_coef: float = 0.5,
        entropy_coef: float = 0.01,
        gamma: float = 1.0,
        lam: float = 1.0,
        whiten_advantages: bool = True,
    ) -> None:
        self.value_coef, self.entropy_coef = value_coef, entropy_coef
        self.gamma, self.lam, self.whiten_advantages = gamma, lam, whiten_advantages

    def advantages(self, experience: Experience) -> tuple[Tensor, Tensor]:
        e = experience
        return gae_advantages(e.rewards, e.values, e.response_mask, self.gamma, self.lam, self.whiten_advantages)

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        policy_loss = policy_gradient_loss(outputs.logprobs, batch.advantages, mask)
        critic_loss = value_loss(outputs.values, batch.returns, mask)
        entropy = masked_mean(outputs.entropy, mask)
        loss = policy_loss + self.value_coef * critic_loss - self.entropy_coef * entropy
        return loss, {
            "policy/loss": policy_loss.detach(),
            "policy/entropy": entropy.detach(),
            "value/loss": critic_loss.detach(),
        }
