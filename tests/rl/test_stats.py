"""What an iteration reports (``lit_rlhf.rl.stats``): degeneration shares on hand-made rollouts, and warnings when
most responses are empty, identical or cut off, given once when it starts and once when it ends."""

import warnings

import pytest
import torch

from lit_rlhf.rl.experience import PolicyOutputs, Rollout, Samples
from lit_rlhf.rl.scoring import to_experience
from lit_rlhf.rl.stats import DegenerationWarnings, iteration_metrics


def rollout_of(completions: list[str], stopped: list[bool]) -> Rollout:
    n = len(completions)
    mask = torch.ones(n, 2)
    samples = Samples(
        prompts=["p"] * n, prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1),
        response_ids=torch.zeros(n, 2, dtype=torch.long), response_mask=mask, stopped=torch.tensor(stopped),
        completions=completions, group=torch.arange(n),
    )  # fmt: skip
    outputs = PolicyOutputs(torch.zeros(n, 2), torch.ones(n, 2), None)
    return Rollout(samples, torch.zeros(n), outputs, torch.zeros(n, 2), {"generate": 0.0})


def test_degeneration_shares_by_hand():
    rollout = rollout_of(["", "ok", "ok", "ok"], [True, True, False, False])
    metrics = iteration_metrics(rollout, to_experience(rollout, torch.zeros(4), "k1", 0.1))
    # 1 of 4 empty; "ok" three times of 4; 2 of 4 never stopped
    assert float(metrics["response/empty_frac"]) == 0.25
    assert float(metrics["response/identical_frac"]) == 0.75
    assert float(metrics["response/truncated_frac"]) == 0.5 and float(metrics["response/eos_frac"]) == 0.5


def test_degeneration_warns_once_when_it_starts_and_once_when_it_ends():
    watch = DegenerationWarnings()
    healthy = {"response/empty_frac": 0.0, "response/identical_frac": 0.25, "response/truncated_frac": 0.1}
    collapsed = {**healthy, "response/identical_frac": 0.9}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for iteration, metrics in enumerate([healthy, collapsed, collapsed, collapsed, healthy]):
            watch({k: torch.tensor(v) for k, v in metrics.items()}, iteration)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("RL iteration 1: 90% of the responses are one and the same text")
    assert messages[1] == "RL iteration 4: response/identical_frac is back to 25%."
    with pytest.warns(UserWarning, match="are empty"):
        watch({**{k: torch.tensor(v) for k, v in healthy.items()}, "response/empty_frac": torch.tensor(0.6)}, 5)


def test_a_share_already_high_at_iteration_0_is_blamed_on_the_setup_not_on_training():
    # The demo's 32-token answers to open prompts are mostly cut off before any update: not a collapse.
    metrics = {"response/empty_frac": 0.0, "response/identical_frac": 0.0, "response/truncated_frac": 0.94}
    with pytest.warns(UserWarning) as caught:
        DegenerationWarnings()({k: torch.tensor(v) for k, v in metrics.items()}, 0)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("RL iteration 0: 94% of the responses are cut off at max_new_tokens")
    assert "before any update, so it comes from the setup" in message and "collapsing" not in message
