"""GRPO (Group Relative Policy Optimization; Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300): no critic; each
completion's advantage is its score standardised within the completions of its prompt, in PPO's clipped surrogate,
with the KL to the reference as a k3 loss term (the paper) or in the reward. The loss normalisations of Dr. GRPO and
DAPO are options, not subclasses."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lit_rlhf.rl.advantages import RewardScaling, group_normalized, masked_mean
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.kl import kl_k3
from lit_rlhf.rl.losses import LossAggregation, aggregate, clipped_surrogate
from lit_rlhf.rl.optimizers.base import PolicyOptimizer, UpdateSchedule


class GRPO(PolicyOptimizer):
    """GRPO's objective (Shao et al. 2024, eq. 3) as a loss over the G = ``generation.num_samples`` completions of
    each prompt: Â_i = (R_i − mean R) / std R on every token of completion i, then
    ``aggregate``(max(−Â·ρ, −Â·clip(ρ, 1±ε)) + β·k3) with ρ = π/π_old and k3 = π_ref/π − log(π_ref/π) − 1.

    β is the module's KL coefficient (``kl: FixedKL(coef=0.04)`` is the paper's). With ``kl_penalty: loss`` (the
    paper) R_i is the score alone and the k3 term joins the loss; with ``reward`` R_i = score − β·Σ_t kl_t (the
    module's ``kl_estimator``), as PPO and RLOO do, and the loss has no KL term.

    Needs ``generation.num_samples`` >= 2.

    Args:
        epochs: Passes over each rollout (the paper's μ; 1 makes ρ = 1, the on-policy case).
        num_minibatches: Optimizer steps per pass; the rollout rows are split into this many shuffled minibatches.
        clip_range: ε: the ratio π/π_old is clipped to [1-ε, 1+ε].
        scale_rewards: Divide the centred returns by their group's std (``group``, the paper), the batch's
            (``batch``) or not at all (``none``, Dr. GRPO).
        loss_aggregation: ``sequence`` (the paper: mean over each completion, then over completions), ``token``
            (DAPO: mean over all tokens of the minibatch) or ``constant`` (Dr. GRPO: sum / (rows × ``max_length``)).
        max_length: The constant of ``constant`` aggregation, usually ``generation.max_new_tokens``; None uses the
            rollout's padded response length.
        kl_penalty: Where β·KL goes: ``loss`` (a k3 term, the paper) or ``reward`` (as PPO / RLOO).
        entropy_coef: Weight of the entropy bonus (subtracted from the loss).
        target_kl: Stop the iteration's update once a minibatch's approximate KL exceeds this; None never stops.
    """

    min_samples = 2

    def __init__(
        self,
        epochs: int = 1,
        num_minibatches: int = 1,
        clip_range: float = 0.2,
        scale_rewards: RewardScaling = "group",
        loss_aggregation: LossAggregation = "sequence",
        max_length: int | None = None,
        kl_penalty: Literal["loss", "reward"] = "loss",
        entropy_coef: float = 0.0,
        target_kl: float | None = None,
    ) -> None:
        if clip_range <= 0:
            raise ValueError(f"GRPO: clip_range must be > 0, got {clip_range}.")
        if kl_penalty not in ("loss", "reward"):
            raise ValueError(f"GRPO: kl_penalty must be 'loss' or 'reward', got {kl_penalty!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"GRPO: max_length must be >= 1 (or null), got {max_length}.")
        self.schedule = UpdateSchedule(epochs, num_minibatches, target_kl)
        self.clip_range, self.scale_rewards = clip_range, scale_rewards
        self.loss_aggregation, self.max_length = loss_aggregation, max_length
        self.kl_penalty, self.entropy_coef = kl_penalty, entropy_coef

    def advantages(self, experience: Experience) -> tuple[Tensor, None]:
        returns = experience.scores if self.kl_penalty == "loss" else experience.rewards.sum(-1)  # (B,)
        advantages = group_normalized(returns.float(), experience.group, self.scale_rewards)
        return advantages.unsqueeze(-1) * experience.response_mask, None

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        surrogate, clipped = clipped_surrogate(outputs.logprobs, batch.logprobs, batch.advantages, self.clip_range)
        per_token = surrogate
        metrics = {}
        if self.kl_penalty == "loss":
            kl = kl_k3(outputs.logprobs, batch.ref_logprobs)
            per_token = surrogate + batch.kl_coef * kl
            metrics["policy/ref_kl"] = masked_mean(kl.detach(), mask)
        entropy = masked_mean(outputs.entropy, mask)
        loss = aggregate(per_token, mask, self.loss_aggregation, self.max_length) - self.entropy_coef * entropy
        return loss, {
            "policy/loss": aggregate(surrogate.detach(), mask, self.loss_aggregation, self.max_length),
            "policy/clip_frac": masked_mean(clipped.float(), mask),
            "policy/entropy": entropy.detach(),
            **metrics,
        }
