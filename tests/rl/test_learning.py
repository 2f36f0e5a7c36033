"""The RL loop learns: on tiny-llama, the share of the letter "a" in completions must clearly rise."""

import pytest

from lit_rlhf.rl import A2C, GRPO, NLPO, PPO, RLOO, FixedKL, GenerationOptions, ReinforcePP
from tests.rl.support import (
    PROMPTS,
    Outputs,
    prompt_loader,
    tiny_module,
    trainer,
)

# (algorithm, learning rate, iterations, samples per prompt): the algorithms that take one optimizer step per rollout
# get a larger step size; the group baselines (RLOO, GRPO) sample 4 completions of each of the 8 prompts.
CASES = {
    "ppo": (lambda: PPO(epochs=2, num_minibatches=2), 1e-2, 12, 1),
    "nlpo": (lambda: NLPO(epochs=2, num_minibatches=2), 1e-2, 12, 1),
    "a2c": (lambda: A2C(entropy_coef=0.0), 3e-2, 20, 1),
    "rloo": (lambda: RLOO(), 3e-2, 12, 4),
    "grpo": (lambda: GRPO(), 3e-2, 12, 4),
    "reinforce_pp": (lambda: ReinforcePP(), 3e-2, 15, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reward_rises(name):
    make, learning_rate, iterations, samples = CASES[name]
    module = tiny_module(
        algorithm=make(),
        learning_rate=learning_rate,
        kl=FixedKL(0.01),  # a small penalty: the random reference gives noisy per-token KL estimates
        generation=GenerationOptions(max_new_tokens=8, num_samples=samples),
    )
    outputs = Outputs()
    trainer(iterations, callbacks=[outputs]).fit(module, prompt_loader(PROMPTS * 2 if samples == 1 else PROMPTS))
    scores = [out["metrics"]["objective/score"] for out in outputs.outputs]
    # The random policy samples "a" about 1 time in 100 (vocabulary of 104 characters).
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert first < 0.05, scores
    assert last > 0.3, scores  # seeded runs reach about 0.6 (PPO, NLPO), 0.95 (A2C) and 1.0 (RLOO, GRPO, REINFORCE++)
