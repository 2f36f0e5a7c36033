"""Policy and value losses (``lit_rlhf.rl.losses``) on numbers worked out by hand."""

import math

import pytest
import torch

from lit_rlhf.rl.losses import (
    aggregate,
    approx_kl,
    clipped_policy_loss,
    clipped_surrogate,
    clipped_value_loss,
    policy_gradient_loss,
    value_loss,
)

LN2 = math.log(2)


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_clipped_policy_loss():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    advantages, mask = torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    # ratios [1.5, 0.5, 1], ε = 0.2:
    #   token 0: max(-1.5, -1.2) = -1.2 (clipped term active); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1, 1) = 1
    #   loss = (-1.2 - 0.5 + 1) / 3 = -0.2333, clip fraction 1/3
    loss, clip_frac = clipped_policy_loss(logp, old, advantages, mask, clip_range=0.2)
    close(loss, -0.7 / 3)
    close(clip_frac, 1 / 3)


def test_clipped_value_loss():
    values, old, returns, mask = (
        torch.tensor([[1.5, 0.0]]),
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[2.0, 0.0]]),
        None,
    )
    mask = torch.ones(1, 2)
    # token 0: (1.5-2)² = 0.25 vs clipped V = 1.2: (1.2-2)² = 0.64 -> 0.64
    # token 1: (0-0)² = 0 vs clipped V = 0.8: 0.64 -> 0.64;  loss = ½ · 0.64 = 0.32, both clipped
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss, 0.32)
    close(clip_frac, 1.0)


def test_plain_policy_gradient_and_value_loss():
    logp, advantages, mask = torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2)
    close(policy_gradient_loss(logp, advantages, mask), 2.0)  # -mean(2 · -1, 1 · -2) = 2
    close(value_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0]]), mask), 1.25)  # ½ · mean(1, 4)


def test_approx_kl_k3():
    old = torch.zeros(1, 2)
    # ρ = 2 on the first token: (2 - 1) - ln 2 = 0.3069; ρ = 1 on the second: 0 -> mean 0.1534
    close(approx_kl(torch.tensor([[LN2, 0.0]]), old, torch.ones(1, 2)), (1 - LN2) / 2)


def test_clipped_surrogate_per_token():
    # the tokens of test_clipped_policy_loss, before averaging: [-1.2, -0.5, 1], clipped only at token 0
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    per_token, clipped = clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), clip_range=0.2)
    close(per_token, [[-1.2, -0.5, 1.0]])
    assert clipped.tolist() == [[True, False, False]]


def test_loss_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    close(aggregate(per_token, mask, "sequence"), 3.0)  # row means 2 and 4, then their mean
    close(aggregate(per_token, mask, "token"), 2.5)  # (1 + 2 + 3 + 4) / 4 tokens
    close(aggregate(per_token, mask, "constant"), 10 / 6)  # sum 10 / (2 rows × T = 3)
    close(aggregate(per_token, mask, "constant", length=5), 1.0)  # sum 10 / (2 rows × 5)
    with pytest.raises(ValueError, match="'sequence', 'token' or 'constant'"):
        aggregate(per_token, mask, "mean")
