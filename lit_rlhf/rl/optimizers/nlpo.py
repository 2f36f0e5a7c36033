"""NLPO (Ramamurthy et al. 2022, "Is Reinforcement Learning (Not) for Natural Language Processing?", RL4LMs,
arXiv 2210.01241): PPO's update, restricted to the top-p tokens of a periodically synced masked copy of the policy."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor

from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.optimizers.base import PolicyOptimizer
from lit_rlhf.rl.optimizers.ppo import PPO
from lit_rlhf.rl.policy import LogitsTransform, causal_lm_forward, position_ids

MASK_ADAPTER = "nlpo_mask"
"""Name of the peft adapter that holds the masked copy when the policy is a LoRA model."""


def top_p_mask(logits: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """The nucleus (top-p) set: the most likely tokens whose probabilities, summed in descending order, first reach
    ``top_p`` (Holtzman et al. 2020), and always at least ``min_tokens_to_keep`` tokens.

    Shape: (..., V) logits -> (..., V) bool, True for tokens in the set.
    """
    probs = logits.float().softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., :min_tokens_to_keep] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class NLPO(PolicyOptimizer):
    """Natural Language Policy Optimization: PPO over a dynamically masked action space.

    A masked copy π_mask of the policy is re-synced from the policy every ``mask_update_interval`` iterations. At
    every step, the tokens outside π_mask's top-``top_mask`` set get logit -inf: rollouts sample from that masked
    distribution, and the log-probs, ratio and entropy of the PPO update use it too. With LoRA, π_mask is a second
    adapter on the same base weights (peft ``add_adapter`` / ``set_adapter``), saved with the policy; without LoRA, a
    frozen deep copy, the submodule ``masked`` (checkpointed, moved and sharded with the module).

    Args:
        top_mask: Probability mass of π_mask's top-p set that the policy may sample from.
        min_tokens_to_keep: The set always holds at least this many tokens.
        mask_update_interval: Copy the policy into π_mask every this many iterations (from iteration 0).
        ppo: PPO's arguments (``epochs``, ``num_minibatches``, ``clip_range``, ``value_coef``, ``entropy_coef`` of
            the masked distribution ...), with PPO's defaults: NLPO's update is PPO's.
    """

    needs_critic = True

    def __init__(
        self,
        top_mask: float = 0.9,
        min_tokens_to_keep: int = 1,
        mask_update_interval: int = 10,
        **ppo: Any,
    ) -> None:
        if not 0.0 < top_mask <= 1.0:
            raise ValueError(f"NLPO(top_mask={top_mask}): must be in (0, 1].")
        if min_tokens_to_keep < 1 or mask_update_interval < 1:
            raise ValueError(
                f"NLPO: min_tokens_to_keep ({min_tokens_to_keep}) and mask_update_interval ({mask_update_interval}) "
                "must be >= 1."
            )
        self.top_mask = top_mask
        self.min_tokens_to_keep = min_tokens_to_keep
        self.mask_update_interval = mask_update_interval
        # The update itself is PPO's: NLPO only changes the action space, so it delegates rather than re-implements.
        self.ppo = PPO(**ppo)
        self.schedule = self.ppo.schedule
        self.masked: nn.Module | None = None  # the deep copy (no LoRA)
        self._adapter: str | None = None  # the policy's trained adapter (LoRA)
        self._allowed_tokens = float("nan")

    # --- the masked copy -------------------------------------------------------------------------------------------

    def setup(self, policy: nn.Module) -> None:
        from peft import PeftModel

        if isinstance(policy, PeftModel):
            self.masked, self._adapter = None, policy.active_adapter
            if MASK_ADAPTER not in policy.peft_config:
                policy.add_adapter(MASK_ADAPTER, copy.deepcopy(policy.peft_config[self._adapter]))
        else:
            self.masked, self._adapter = copy.deepcopy(policy).requires_grad_(False).eval(), None
        self.sync(policy)

    def sync(self, policy: nn.Module) -> None:
        """Copy the policy's current weights into π_mask (only the LoRA tensors with LoRA)."""
        if self.masked is not None:
            self.masked.load_state_dict(policy.state_dict())
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        weights = get_peft_model_state_dict(policy, adapter_name=self._adapter)
        set_peft_model_state_dict(policy, weights, adapter_name=MASK_ADAPTER)

    @contextmanager
    def masked_policy(self, policy: nn.Module) -> Iterator[nn.Module]:
        """π_mask, as a model to call: the deep copy, or the policy with the snapshot adapter active."""
        if self.masked is not None:
            yield self.masked
            return
        policy.set_adapter(MASK_ADAPTER)
        try:
            yield policy
        finally:
            policy.set_adapter(self._adapter)  # also makes the trained adapter the trainable one again

    def on_iteration_start(self, policy: nn.Module, iteration: int) -> None:
        if iteration % self.mask_update_interval == 0:
            self.sync(policy)

    # --- the masked action space -----------------------------------------------------------------------------------

    def logits_processor(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> LogitsProcessor:
        return _MaskedTopPProcessor(self, policy, prompt_mask)

    def logits_transform(
        self, policy: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int
    ) -> LogitsTransform:
        with torch.no_grad(), self.masked_policy(policy) as model:
            mask_logits, _ = causal_lm_forward(model, sequences, attention_mask, prompt_length)
        allowed = top_p_mask(mask_logits, self.top_mask, self.min_tokens_to_keep)
        # The sampled token was in the set during generation; a cached vs. full forward can differ in the last bits
        # and drop a boundary token, which would make its log-prob -inf.
        allowed.scatter_(-1, sequences[:, prompt_length:].unsqueeze(-1), True)
        response = attention_mask[:, prompt_length:].bool()
        self._allowed_tokens = allowed.sum(-1)[response].float().mean().item()
        return lambda logits: logits.masked_fill(~allowed, float("-inf"))

    # --- the update: PPO's -----------------------------------------------------------------------------------------

    def advantages(self, experience: Experience) -> tuple[Tensor, Tensor]:
        return self.ppo.advantages(experience)

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = self.ppo.loss(batch, outputs)
        metrics["nlpo/allowed_tokens"] = torch.tensor(self._allowed_tokens)
        return loss, metrics


class _MaskedTopPProcessor(LogitsProcessor):
    """During ``generate``: runs π_mask beside the policy (with its own KV cache) and sets the policy's scores to
    -inf outside π_mask's top-p set. ``__call__``: input_ids (B, L), scores (B, V) -> (B, V)."""

    def __init__(self, nlpo: NLPO, policy: nn.Module, prompt_mask: Tensor) -> None:
        self.nlpo, self.policy = nlpo, policy
        self.attention_mask = prompt_mask
        self.positions: Tensor | None = None
        self.cache = None
        self.seen = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        new_ids = input_ids[:, self.seen :]
        if self.positions is None:
            attention_mask, positions = self.attention_mask, position_ids(self.attention_mask)
        else:
            steps = torch.arange(1, new_ids.shape[1] + 1, device=input_ids.device)
            attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(new_ids.shape)], dim=1)
            positions = self.positions[:, -1:] + steps
        with torch.no_grad(), self.nlpo.masked_policy(self.policy) as model:
            out = model(
                input_ids=new_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
            )
        self.cache, self.attention_mask, self.positions = out.cache, attention_mask, positions
        self.seen = input_ids.shape[1]
        allowed = top_p_mask(out.logits[:, -1], self.nlpo.top_mask, self.nlpo.min_tokens_to_keep)
        return scores.masked_fill(~allowed, float("-inf"))
