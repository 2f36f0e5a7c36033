"""The RL loop learns: on tiny-llama, the share of the letter "a" in completions must clearly rise."""

import pytest

from lit_rlhf.rl import A2C, NLPO, PPO, FixedKL, GenerationOptions
from tests.rl.support import (
    PROMPTS,
    Outputs,
    prompt_loader,
    tiny_module,
    trainer,
)

# (algorithm, learning rate, iterations): A2C takes one optimizer step per rollout, so it gets a larger step size.
CASES = {
    "ppo": (lambda: PPO(epochs=2, num_minibatches=2), 1e-2, 12),
    "nlpo": (lambda: NLPO(epochs=2, num_minibatches=2), 1e-2, 12),
    "a2c": (lambda: A2C(entropy_coef=0.0), 3e-2, 20),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reward_rises(name):
    make, learning_rate, iterations = CASES[name]
    module = tiny_module(
        algorithm=make(),
        learning_rate=learning_rate,
        kl=FixedKL(0.01),  # a small penalty: the random reference gives noisy per-token KL estimates
        generation=GenerationOptions(max_new_tokens=8),
    )
    outputs = Outputs()
    trainer(iterations, callbacks=[outputs]).fit(module, prompt_loader(PROMPTS * 2))
    scores = [out["metrics"]["objective/score"] for out in outputs.outputs]
    # The random policy samples "a" about 1 time in 100 (vocabulary of 104 characters).
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert first < 0.05, scores
    assert last > 0.3, scores  # seeded runs reach about 0.6 (PPO, NLPO) and 0.95 (A2C)
