"""RL math on numbers worked out by hand: log-probs, entropy, stop masks, KL, rewards, GAE, whitening, losses."""

import math

import pytest
import torch

from lit_rlhf.rl.advantages import discounted_returns, explained_variance, gae, masked_mean, masked_var, whiten
from lit_rlhf.rl.kl import AdaptiveKL, FixedKL, kl_estimate, kl_k1, kl_k3
from lit_rlhf.rl.losses import approx_kl, clipped_policy_loss, clipped_value_loss, policy_gradient_loss, value_loss
from lit_rlhf.rl.optimizers.nlpo import top_p_mask
from lit_rlhf.rl.rollout import (
    GenerationOptions,
    RunningMoments,
    cut_at_stop_strings,
    entropy_from_logits,
    kl_penalized_rewards,
    logprobs_from_logits,
    position_ids,
    stop_mask,
    stop_string_positions,
)

LN2 = math.log(2)


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_logprobs_from_logits():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]; tokens 2 then 0 -> [ln 1/2, ln 1/4]
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    close(logprobs_from_logits(logits, torch.tensor([[2, 0]])), [[-LN2, -2 * LN2]])


def test_entropy_uniform_and_masked():
    # uniform over 4 -> ln 4; two of four at -inf -> uniform over 2 -> ln 2, and the gradient stays finite
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    close(entropy, [[2 * LN2, LN2]])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_position_ids_skip_left_padding():
    close(position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_stop_mask_keeps_first_stop_and_masks_after():
    is_stop = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mask, stopped = stop_mask(is_stop)
    # row 0 stops at index 1 (kept), row 1 never stops (all kept), row 2 stops at once
    close(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert stopped.tolist() == [True, False, True]


def test_stop_string_positions_and_cut(tiny_llama_path):
    from lit_rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama_path)
    ids = torch.tensor([tokenizer("ab.cd", add_special_tokens=False)["input_ids"], tokenizer("abcde")["input_ids"]])
    # the character tokenizer maps one character to one token: "." is token 2 of row 0; row 1 has none
    assert stop_string_positions(tokenizer, ids, ["."]).tolist() == [2, -1]
    # row 0: "b." completes at index 2, before "cd" (index 4); row 1: "cd" completes at index 3
    assert stop_string_positions(tokenizer, ids, ["cd", "b."]).tolist() == [2, 3]
    assert cut_at_stop_strings("hello. bye. x", ["bye", "."]) == "hello"
    assert cut_at_stop_strings("no stop", ["."]) == "no stop"


def test_kl_estimators():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # k1 = ln 0.5 - ln 0.25 = ln 2; k3 with r = 0.25 / 0.5 = 0.5: (0.5 - 1) - ln 0.5 = ln 2 - 0.5
    close(kl_k1(logp, ref), [[LN2]])
    close(kl_k3(logp, ref), [[LN2 - 0.5]])
    close(kl_estimate(logp, ref, "k3"), [[LN2 - 0.5]])
    # k3 is never negative, k1 can be
    assert kl_k3(ref, logp).item() >= 0 and kl_k1(ref, logp).item() < 0
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k2")


def test_kl_penalized_rewards_put_score_on_last_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # β = 0.1: row 0 -> [-0.01, -0.02 + 1, 0] (index 2 is masked); row 1 -> [-0.05, -0.05, -0.05 + 2]
    close(kl_penalized_rewards(scores, kl, mask, 0.1), [[-0.01, 0.98, 0.0], [-0.05, -0.05, 1.95]])


def test_fixed_and_adaptive_kl_controllers():
    fixed = FixedKL(0.3)
    fixed.update(100.0, 64)
    assert fixed.coef == 0.3
    ctrl = AdaptiveKL(init_coef=0.2, target=6.0, horizon=100)
    ctrl.update(9.0, 10)  # e = clip(9/6 - 1 = 0.5) = 0.2 -> 0.2 · (1 + 0.2 · 10/100) = 0.204
    close(ctrl.coef, 0.204, 1e-9)
    ctrl.update(3.0, 10)  # e = clip(-0.5) = -0.2 -> 0.204 · (1 - 0.02) = 0.19992
    close(ctrl.coef, 0.19992, 1e-9)
    ctrl.update(6.6, 10)  # e = 0.1 -> 0.19992 · 1.01 = 0.2019192
    close(ctrl.coef, 0.2019192, 1e-9)
    restored = AdaptiveKL(init_coef=1.0, target=6.0, horizon=100)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.coef == ctrl.coef
    with pytest.raises(ValueError, match="coef"):
        FixedKL(-1.0)


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


def test_top_p_mask():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05; mass before: 0, .5, .8, .95
    logits = probs.log()
    assert top_p_mask(logits, 0.9).tolist() == [False, True, True, True]
    assert top_p_mask(logits, 0.5).tolist() == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert top_p_mask(logits, 0.5, min_tokens_to_keep=2).tolist() == [False, True, False, True]
    assert top_p_mask(logits, 1.0).all()
    assert top_p_mask(logits.expand(2, 3, 4), 0.9).shape == (2, 3, 4)


def test_running_moments():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    # all five values: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    close(moments.mean, 3.0, 1e-9)
    close(moments.var, 2.0, 1e-9)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_generation_options():
    config = GenerationOptions(max_new_tokens=5, temperature=0.7, stop_strings=["\n"]).to_hf([3], 0)
    assert (config.max_new_tokens, config.temperature, config.top_k, config.top_p) == (5, 0.7, 0, 1.0)
    assert config.stop_strings == ["\n"] and config.eos_token_id == [3] and config.pad_token_id == 0
    greedy = GenerationOptions(do_sample=False, temperature=0.5).to_hf([3], 0)
    assert not greedy.do_sample and greedy.temperature == 1.0
    for bad in ({"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_k": -1}, {"num_samples": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationOptions(**bad)


def test_fused_logprobs_and_entropy_match_the_separate_functions():
    from lit_rlhf.rl.rollout import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits

    logits = torch.randn(2, 3, 5)
    logits[0, 0, 1] = float("-inf")  # a masked token (NLPO) must not turn either output into nan
    tokens = torch.tensor([[0, 2, 4], [1, 1, 3]])
    logprobs, entropy = logprobs_and_entropy(logits, tokens)
    torch.testing.assert_close(logprobs, logprobs_from_logits(logits, tokens))
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    assert torch.isfinite(entropy).all()


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
