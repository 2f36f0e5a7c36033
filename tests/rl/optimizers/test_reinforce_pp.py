"""REINFORCE++ (``lit_rlhf.rl.optimizers.reinforce_pp``): token returns whitened over the batch, with and without the
group baseline, on numbers worked out by hand, and a run through ``RLHFModule`` with one sample per prompt."""

import pytest
import torch

from lit_rlhf.rl import GenerationOptions, ReinforcePP
from lit_rlhf.rl.experience import Experience
from tests.rl.support import Outputs, prompt_loader, tiny_module, trainer


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def experience() -> Experience:
    empty = torch.zeros(2, 2)
    return Experience(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1), response_ids=empty.long(),
        response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), logprobs=empty, ref_logprobs=empty, values=None,
        scores=torch.tensor([1.0, 3.0]), kl=torch.tensor([[0.5, 0.5], [1.0, 0.0]]),
        rewards=torch.tensor([[0.0, 1.0], [2.0, 0.0]]), group=torch.tensor([0, 0]), kl_coef=0.1,
    )  # fmt: skip


def test_returns_whitened_over_the_batch():
    # rewards [[0, 1], [2, ·]] -> returns-to-go [[1, 1], [2, ·]]; mean 4/3, std sqrt(2/9) = 0.4714
    advantages, returns = ReinforcePP().advantages(experience())
    assert returns is None
    close(advantages, [[-0.7071, -0.7071], [1.4142, 0.0]])


def test_group_baseline_centres_the_scores_before_the_kl_penalty():
    # scores [1, 3] minus their mean 2 -> [-1, 1]; rewards -0.1·kl plus that on the last token:
    # [[-0.05, -1.05], [0.9, ·]] -> returns [[-1.1, -1.05], [0.9, ·]]; mean -0.416667, variance 1.040833 - 0.173611,
    # std 0.931248 -> [[-0.73378, -0.68009], [1.41387, 0]]
    advantages, _ = ReinforcePP(baseline="group").advantages(experience())
    close(advantages, [[-0.7338, -0.6801], [1.4139, 0.0]])
    with pytest.raises(ValueError, match="num_samples >= 2"):
        ReinforcePP(baseline="group").advantages(experience().select(torch.tensor([0])))
    with pytest.raises(ValueError, match="'none' or 'group'"):
        ReinforcePP(baseline="mean")


def test_reinforce_pp_trains_with_one_sample_per_prompt():
    module = tiny_module(algorithm=ReinforcePP(), generation=GenerationOptions(max_new_tokens=8))
    assert module.models.critic is None
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())
    assert outputs.outputs[-1]["metrics"]["policy/optimizer_steps"] == 1
    assert any(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
