"""Advantages and returns (``lit_rlhf.rl.advantages``) on numbers worked out by hand: GAE, masking, whitening, group
baselines."""

import math

import pytest
import torch

from lit_rlhf.rl.advantages import (
    discounted_returns,
    explained_variance,
    gae,
    global_whiten,
    group_normalized,
    masked_mean,
    masked_var,
    whiten,
)

LN2 = math.log(2)


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_gae_monte_carlo_and_lambda():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    # γ = λ = 1: δ = [0, 0, 0.5] (V after the end is 0) -> A = [0.5, 0.5, 0.5], returns = A + V = 1 everywhere
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.5, 0.5]])
    close(returns, [[1.0, 1.0, 1.0]])
    # λ = 0.5: A2 = 0.5, A1 = 0 + 0.5 · 0.5 = 0.25, A0 = 0 + 0.5 · 0.25 = 0.125
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[0.125, 0.25, 0.5]])


def test_gae_stops_at_the_mask():
    # the state after token 1 is terminal: V=9 at the masked index 2 must not leak back
    rewards, values = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # δ1 = 1 + 0 - 0.5 = 0.5, δ0 = 0 + 0.5 - 0.5 = 0 -> A = [0.5, 0.5, 0], returns = [1, 1, 0]
    close(advantages, [[0.5, 0.5, 0.0]])
    close(returns, [[1.0, 1.0, 0.0]])


def test_gae_with_zero_values_equals_discounted_returns():
    rewards, mask = torch.tensor([[1.0, 0.0, 2.0]]), torch.ones(1, 3)
    # γ = 0.9: G2 = 2, G1 = 0 + 0.9 · 2 = 1.8, G0 = 1 + 0.9 · 1.8 = 2.62
    close(discounted_returns(rewards, mask, gamma=0.9), [[2.62, 1.8, 2.0]])
    advantages, _ = gae(rewards, torch.zeros(1, 3), mask, gamma=0.9, lam=1.0)
    close(advantages, [[2.62, 1.8, 2.0]])


def test_masked_statistics_and_whitening():
    values, mask = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    close(masked_mean(values, mask), 8 / 3)  # (1 + 3 + 4) / 3
    close(masked_mean(values, mask, dim=1), [1.0, 3.5])
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    close(masked_var(x, m), 2 / 3)  # mean 2, ((-1)² + 0 + 1²) / 3
    # (x - 2) / sqrt(2/3) = ±1.2247; the masked 100 becomes 0
    close(whiten(x, m), [[-1.2247, 0.0, 1.2247, 0.0]])
    close(whiten(x, m, shift_mean=False), [[0.7753, 2.0, 3.2247, 0.0]])


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    close(explained_variance(returns, returns, mask), 1.0)  # perfect critic
    close(explained_variance(torch.full((1, 3), 2.0), returns, mask), 0.0)  # predicts the mean
    assert math.isnan(explained_variance(returns, torch.ones(1, 3), mask).item())  # returns do not vary


def test_gae_advantages_whitens_advantages_but_not_returns():
    from lit_rlhf.rl.advantages import gae_advantages

    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5]])
    mask = torch.ones(1, 2)
    # γ = λ = 1: δ = [0 + 0.5 - 0.5, 1 - 0.5] = [0, 0.5]; A = [0.5, 0.5]; returns = A + V = [1, 1]
    raw, returns = gae_advantages(rewards, values, mask, 1.0, 1.0, whiten_advantages=False)
    torch.testing.assert_close(raw, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0]]))
    whitened, same_returns = gae_advantages(rewards, values, mask, 1.0, 1.0, whiten_advantages=True)
    torch.testing.assert_close(whitened, torch.zeros(1, 2))  # equal advantages whiten to 0
    torch.testing.assert_close(same_returns, returns)


def test_group_normalized_advantages():
    returns, group = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0]), torch.tensor([0, 0, 0, 1, 1])
    # prompt 0: mean 2, centred [-1, 0, 1], sample std sqrt(2 / 2) = 1; prompt 1: mean 2, centred [-2, 2],
    # sample std sqrt(8 / 1) = 2.8284 -> [-0.7071, 0.7071]
    close(group_normalized(returns, group, "group"), [-1.0, 0.0, 1.0, -0.7071, 0.7071])
    # batch std: mean 2, squares 1 + 0 + 1 + 4 + 4 = 10, sqrt(10 / 4) = 1.5811 -> centred / 1.5811
    close(group_normalized(returns, group, "batch"), [-0.6325, 0.0, 0.6325, -1.2649, 1.2649])
    close(group_normalized(returns, group, "none"), [-1.0, 0.0, 1.0, -2.0, 2.0])
    close(group_normalized(torch.tensor([3.0, 3.0]), torch.tensor([0, 0])), [0.0, 0.0])  # all equal: no signal
    with pytest.raises(ValueError, match="num_samples >= 2"):
        group_normalized(returns[:4], group[:4])  # prompt 1 keeps one completion
    with pytest.raises(ValueError, match="'group', 'batch' or 'none'"):
        group_normalized(returns, group, "std")


def test_global_whiten_in_one_process_is_whiten():
    values, mask = torch.tensor([[1.0, 1.0], [2.0, 7.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # kept values 1, 1, 2: mean 4/3, variance 2 - 16/9 = 2/9, std 0.4714 -> [-0.7071, -0.7071, 1.4142], 0 where masked
    close(global_whiten(values, mask), [[-0.7071, -0.7071], [1.4142, 0.0]])
    close(global_whiten(values, mask), whiten(values, mask))
