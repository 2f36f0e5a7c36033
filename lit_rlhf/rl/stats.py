"""What an RL iteration reports about its rollout: the ``objective/``, ``response/``, ``value/`` and ``time/``
metrics that every algorithm logs under the same names (docs/metrics.md), and warnings when the responses degenerate."""

from __future__ import annotations

from collections import Counter

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_rlhf.rl.advantages import explained_variance, masked_mean
from lit_rlhf.rl.experience import Experience, Rollout

DEGENERATE = {
    "response/empty_frac": "empty (no text after special tokens are dropped)",
    "response/identical_frac": "one and the same text",
    "response/truncated_frac": "cut off at max_new_tokens without a stop",
}
"""Signs of a collapsing policy: the share of an iteration's responses that are empty, the same text, or never stop."""


def iteration_metrics(rollout: Rollout, experience: Experience) -> dict[str, Tensor]:
    """The rollout's metrics on this process: raw scores, rewards, KL, entropy, lengths and the degeneration
    shares, the critic's fit (when there is one) and the rollout's timings. Values are scalars (0-d tensors)."""
    mask, completions = experience.response_mask, rollout.samples.completions
    most_common = Counter(completions).most_common(1)[0][1] if completions else 0
    metrics = {
        "objective/score": rollout.raw_scores.mean(),
        "objective/score_std": rollout.raw_scores.std(unbiased=False),
        "objective/reward": experience.rewards.sum(-1).mean(),
        "objective/kl": experience.kl.sum(-1).mean(),
        "objective/entropy": masked_mean(rollout.outputs.entropy, mask),
        "response/length": mask.sum(-1).mean(),
        "response/eos_frac": rollout.samples.stopped.float().mean(),
        "response/truncated_frac": 1 - rollout.samples.stopped.float().mean(),
        "response/empty_frac": torch.tensor(sum(not c.strip() for c in completions) / max(len(completions), 1)),
        "response/identical_frac": torch.tensor(
            most_common / max(len(completions), 1) if len(completions) > 1 else 0.0
        ),
        **{f"time/{part}": torch.tensor(value) for part, value in rollout.seconds.items()},
    }
    if experience.values is not None and experience.returns is not None:
        metrics["value/explained_variance"] = explained_variance(experience.values, experience.returns, mask)
        metrics["value/mean"] = masked_mean(experience.values, mask)
    return metrics


class DegenerationWarnings:
    """Warns when most of an iteration's responses are empty, one and the same text, or cut off at
    ``max_new_tokens``: once when it starts and once when it ends, not at every iteration in between. At iteration 0
    the responses are the initial policy's, so the warning there names the setup rather than a collapse.

    Args:
        threshold: The share of responses above which an iteration counts as degenerate.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.active: set[str] = set()

    def __call__(self, metrics: dict[str, Tensor], iteration: int) -> None:
        """Check one iteration's metrics (averaged over processes)."""
        for key, what in DEGENERATE.items():
            share = float(metrics[key])
            if share > self.threshold and key not in self.active:
                self.active.add(key)
                if iteration == 0:
                    advice = (
                        "before any update, so it comes from the setup (the initial policy, the prompts, "
                        "generation.max_new_tokens and the stop tokens), not from training"
                    )
                else:
                    advice = (
                        "the policy may be collapsing or exploiting the reward: look at the samples, and consider a "
                        "larger KL coefficient, a lower learning rate, or a reward that penalises it "
                        "(missing_eos_penalty for cut-off ones)"
                    )
                rank_zero_warn(f"RL iteration {iteration}: {share:.0%} of the responses are {what} ({key}); {advice}.")
            elif share <= self.threshold and key in self.active:
                self.active.discard(key)
                rank_zero_warn(f"RL iteration {iteration}: {key} is back to {share:.0%}.")
