"""NLPO (``lit_rlhf.rl.optimizers.nlpo``): the top-p set by hand, sampling only inside π_mask's set, and the
masked copy re-synced on schedule, with and without LoRA."""

import pytest
import torch

from lit_rlhf.models import LoraOptions
from lit_rlhf.rl import NLPO
from lit_rlhf.rl.optimizers.nlpo import MASK_ADAPTER, top_p_mask
from lit_rlhf.rl.policy import (
    causal_lm_forward,
)
from tests.rl.support import PROMPTS, prompt_batch, tiny_module


def test_top_p_mask():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05; mass before: 0, .5, .8, .95
    logits = probs.log()
    assert top_p_mask(logits, 0.9).tolist() == [False, True, True, True]
    assert top_p_mask(logits, 0.5).tolist() == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert top_p_mask(logits, 0.5, min_tokens_to_keep=2).tolist() == [False, True, False, True]
    assert top_p_mask(logits, 1.0).all()
    assert top_p_mask(logits.expand(2, 3, 4), 0.9).shape == (2, 3, 4)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_nlpo_samples_only_from_the_masked_top_p_set(lora):
    nlpo = NLPO(top_mask=0.3, min_tokens_to_keep=2)
    module = tiny_module(algorithm=nlpo, lora=LoraOptions(r=4) if lora else None)
    module.eval()
    with torch.no_grad():  # make π_mask differ from the policy so that its mask, not the policy's, is tested
        target = module.policy if lora else nlpo.masked
        for n, p in target.named_parameters():
            if not lora or (MASK_ADAPTER in n and "lora_B" in n):
                p.add_(0.05 * torch.randn_like(p))
    rollout = module.generator.rollout(prompt_batch(PROMPTS), nlpo)
    exp = rollout.samples
    length = exp.prompt_ids.shape[1]
    with torch.no_grad(), nlpo.masked_policy(module.policy) as masked:
        logits, _ = causal_lm_forward(masked, exp.sequences, exp.attention_mask, length)
    allowed = top_p_mask(logits, 0.3, 2).gather(-1, exp.response_ids.unsqueeze(-1)).squeeze(-1)
    assert allowed[exp.response_mask.bool()].all()
    assert torch.isfinite(rollout.outputs.logprobs).all()
    # top 30% of π_mask's mass: a small share of the 104-token vocabulary, and never fewer than 2 tokens
    assert 2 <= nlpo._allowed_tokens < 50
    if lora:
        assert nlpo.masked is None and module.policy.active_adapter == "default"
        trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n for n in trainable)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_nlpo_resyncs_the_masked_copy_on_schedule(lora):
    nlpo = NLPO(mask_update_interval=3)
    module = tiny_module(algorithm=nlpo, lora=LoraOptions(r=4) if lora else None)

    def masked_weights():
        if not lora:
            return {n: p.clone() for n, p in nlpo.masked.named_parameters()}
        return {
            n.replace(MASK_ADAPTER, "default"): p.clone()
            for n, p in module.policy.named_parameters()
            if MASK_ADAPTER in n
        }

    def policy_weights(keys):
        return {n: p.detach().clone() for n, p in module.policy.named_parameters() if n in keys}

    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = masked_weights()
    nlpo.on_iteration_start(module.policy, 1)  # not a multiple of 3: no sync
    assert all(torch.equal(before[n], p) for n, p in masked_weights().items())
    assert any(not torch.equal(before[n], p) for n, p in policy_weights(before).items())
    nlpo.on_iteration_start(module.policy, 3)
    after, policy = masked_weights(), policy_weights(before)
    assert all(torch.equal(after[n], policy[n]) for n in after)
