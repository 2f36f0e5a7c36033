"""From text to rewards (``lit_rlhf.rl.scoring``): the reward contract, score shaping, running moments and the
KL-penalised per-token rewards, on numbers worked out by hand."""

import math

import pytest
import torch

from lit_rlhf.rewards import CharacterShareReward
from lit_rlhf.rl.scoring import RewardShaping, RunningMoments, kl_penalized_rewards, score

LN2 = math.log(2)


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_kl_penalized_rewards_put_score_on_last_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # β = 0.1: row 0 -> [-0.01, -0.02 + 1, 0] (index 2 is masked); row 1 -> [-0.05, -0.05, -0.05 + 2]
    close(kl_penalized_rewards(scores, kl, mask, 0.1), [[-0.01, 0.98, 0.0], [-0.05, -0.05, 1.95]])


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


def test_score_shaping_and_reward_checks():
    shaping = RewardShaping(missing_eos_penalty=1.0, normalize=True, clip=1.0)
    raw, stopped = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, True, True])
    # penalty -> [1, 1, 3, 4]; mean 2.25, population std sqrt(1.6875) = 1.29904
    # -> [-0.9623, -0.9623, 0.5774, 1.3472]; clipped at 1
    torch.testing.assert_close(shaping(raw, stopped), torch.tensor([-0.9623, -0.9623, 0.5774, 1.0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one score per completion"):
        score(lambda prompts, completions: [0.0], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-finite"):
        score(lambda prompts, completions: [float("nan")] * len(completions), ["a"], ["b"])
    with pytest.raises(RuntimeError, match="model.reward"):
        score(None, ["a"], ["b"])
    with pytest.raises(ValueError, match="reward_clip"):
        RewardShaping(clip=0.0)


def test_the_reward_contract_errors_name_the_reward_and_what_it_returned():
    def labels(prompts, completions):
        return ["good"] * len(completions)

    with pytest.raises(TypeError, match=r"reward tests\.rl\.test_scoring\.[\w.<>]*labels returned \['good', 'good'\]"):
        score(labels, ["a", "b"], ["c", "d"])
    with pytest.raises(TypeError, match=r"returned None \(NoneType\) for 2 completions"):
        score(lambda prompts, completions: None, ["a", "b"], ["c", "d"])
    # A 2-D score is reported with its own shape, not the flattened one; (N, 1) is one score per completion.
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\) for 2 completions"):
        score(lambda prompts, completions: torch.zeros(2, 3), ["a", "b"], ["c", "d"])
    assert score(lambda prompts, completions: torch.ones(2, 1), ["a", "b"], ["c", "d"]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"reward OneScore\(target='a'\) returned shape \(1,\)"):
        score(OneScore("a"), ["a", "b"], ["c", "d"])


class OneScore(CharacterShareReward):
    """Scores only the first completion: a reward with the wrong output length."""

    def __call__(self, prompts, completions):
        return super().__call__(prompts[:1], completions[:1])
