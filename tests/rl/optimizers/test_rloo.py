"""RLOO (``lit_rlhf.rl.optimizers.rloo``): leave-one-out advantages by hand, training through ``RLHFModule`` without
a critic, and the class the docs page on new algorithms walks through (within its 60-line budget)."""

import inspect

import pytest
import torch

from lit_rlhf.rl import RLOO, GenerationOptions
from lit_rlhf.rl.experience import Experience
from lit_rlhf.rl.optimizers import rloo
from tests.rl.support import PROMPTS, Outputs, prompt_batch, prompt_loader, tiny_module, trainer


def test_rloo_is_a_small_file():
    assert len(inspect.getsource(rloo).splitlines()) <= 60


def test_rloo_leave_one_out_advantages():
    # prompt 0 has returns [1, 2, 3]: baselines [(2+3)/2, (1+3)/2, (1+2)/2] = [2.5, 2, 1.5] -> A = [-1.5, 0, 1.5]
    # prompt 1 has returns [0, 4]: baselines [4, 0] -> A = [-4, 4]; spread over each row's response tokens
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    empty = torch.zeros(5, 2)
    experience = Experience(
        prompt_ids=torch.zeros(5, 1, dtype=torch.long), prompt_mask=torch.ones(5, 1), response_ids=empty.long(),
        response_mask=mask, logprobs=empty, ref_logprobs=empty, values=None, scores=torch.zeros(5), kl=empty,
        rewards=rewards, group=torch.tensor([0, 0, 0, 1, 1]),
    )  # fmt: skip
    advantages, returns = RLOO().advantages(experience)
    assert returns is None
    torch.testing.assert_close(advantages, torch.tensor([[-1.5, -1.5], [0.0, 0.0], [1.5, 1.5], [-4.0, -4.0], [4, 4.0]]))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        RLOO().advantages(experience.select(torch.tensor([0, 1, 2, 3])))  # prompt 1 keeps one completion


def test_rloo_trains_through_rlhf_module_without_a_critic():
    module = tiny_module(algorithm=RLOO(), generation=GenerationOptions(max_new_tokens=8, num_samples=2))
    assert module.models.critic is None  # no critic was built
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())
    assert all(torch.isfinite(torch.tensor(o["metrics"]["policy/loss"])) for o in outputs.outputs)
    assert len(outputs.outputs[0]["completions"]) == 2 * len(PROMPTS)
    assert any(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
    rollout = module.generator.rollout(prompt_batch(PROMPTS[:2]), module.algorithm)
    assert rollout.samples.group.tolist() == [0, 0, 1, 1]
