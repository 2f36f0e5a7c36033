"""GRPO (``lit_rlhf.rl.optimizers.grpo``): group-normalised advantages and the loss in each normalisation and KL
placement, on numbers worked out by hand, and a run through ``RLHFModule`` without a critic."""

import math

import pytest
import torch

from lit_rlhf.rl import GRPO, GenerationOptions
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from tests.rl.support import Outputs, prompt_loader, tiny_module, trainer


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def experience(**fields) -> Experience:
    """Two completions of one prompt, response length 2, the second one token long."""
    empty = torch.zeros(2, 2)
    defaults = dict(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1), response_ids=empty.long(),
        response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), logprobs=empty, ref_logprobs=empty, values=None,
        scores=torch.zeros(2), kl=empty, rewards=empty, group=torch.tensor([0, 0]),
    )  # fmt: skip
    return Experience(**{**defaults, **fields})


def test_advantages_use_the_score_or_the_kl_penalised_return():
    e = experience(scores=torch.tensor([1.0, 3.0]), rewards=torch.tensor([[0.0, 5.0], [0.0, 0.0]]))
    # kl_penalty "loss": R = scores [1, 3]: mean 2, sample std sqrt(2) -> ±0.7071 on each row's response tokens
    advantages, returns = GRPO().advantages(e)
    assert returns is None
    close(advantages, [[-0.7071, -0.7071], [0.7071, 0.0]])
    # kl_penalty "reward": R = rewards summed [5, 0] -> the order flips; scale "none" keeps the centred [2.5, -2.5]
    close(GRPO(kl_penalty="reward").advantages(e)[0], [[0.7071, 0.7071], [-0.7071, 0.0]])
    close(GRPO(kl_penalty="reward", scale_rewards="none").advantages(e)[0], [[2.5, 2.5], [-2.5, 0.0]])


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        # per token: -A + β·k3 with A = [[1, 1], [-1, ·]], β = 0.1, k3 = 0.5 - 1 - log 0.5 = 0.193147 (π = 1/2,
        # π_ref = 1/4), so [[-0.980685, -0.980685], [1.019315, ·]]
        ("sequence", 0.019315),  # row means -0.980685 and 1.019315, averaged
        ("token", -0.314019),  # (-0.980685·2 + 1.019315) / 3 tokens
        ("constant", -0.117757),  # the same sum -0.942056 / (2 rows × max_length 4)
    ],
)
def test_loss_normalisations_with_the_kl_term(aggregation, expected):
    half, quarter = torch.full((2, 2), math.log(0.5)), torch.full((2, 2), math.log(0.25))
    e = experience(logprobs=half, ref_logprobs=quarter, advantages=torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), kl_coef=0.1)
    outputs = PolicyOutputs(logprobs=half.clone(), entropy=torch.zeros(2, 2), values=None)  # on-policy: ratio 1
    loss, metrics = GRPO(loss_aggregation=aggregation, max_length=4).loss(e, outputs)
    close(loss, expected)
    close(metrics["policy/ref_kl"], 0.193147)
    close(metrics["policy/clip_frac"], 0.0)
    # KL in the reward instead: the loss is the surrogate alone (sequence: mean of -1 and 1 = 0)
    loss, metrics = GRPO(kl_penalty="reward").loss(e, outputs)
    close(loss, 0.0)
    assert "policy/ref_kl" not in metrics


def test_arguments_are_checked():
    for kwargs, message in [
        ({"clip_range": 0.0}, "clip_range must be > 0"),
        ({"kl_penalty": "both"}, "'loss' or 'reward'"),
        ({"max_length": 0}, "max_length must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            GRPO(**kwargs)


def test_grpo_trains_through_rlhf_module_without_a_critic():
    module = tiny_module(algorithm=GRPO(epochs=2), generation=GenerationOptions(max_new_tokens=8, num_samples=2))
    assert module.models.critic is None
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())
    metrics = outputs.outputs[-1]["metrics"]
    assert metrics["policy/optimizer_steps"] == 2 and math.isfinite(metrics["policy/ref_kl"])
    assert any(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
