"""What an RL iteration reports about its rollout: the ``objective/``, ``response/``, ``value/`` and ``time/``
metrics that every algorithm logs under the same names (docs/metrics.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.rl.advantages import explained_variance, masked_mean
from lit_rlhf.rl.experience import Experience, Rollout


def iteration_metrics(rollout: Rollout, experience: Experience) -> dict[str, Tensor]:
    """The rollout's metrics on this process: raw scores, rewards, KL, entropy, lengths, the critic's fit (when
    there is one) and the rollout's timings. Values are scalars (0-d tensors)."""
    mask = experience.response_mask
    metrics = {
        "objective/score": rollout.raw_scores.mean(),
        "objective/score_std": rollout.raw_scores.std(unbiased=False),
        "objective/reward": experience.rewards.sum(-1).mean(),
        "objective/kl": experience.kl.sum(-1).mean(),
        "objective/entropy": masked_mean(rollout.outputs.entropy, mask),
        "response/length": mask.sum(-1).mean(),
        "response/eos_frac": rollout.samples.stopped.float().mean(),
        **{f"time/{part}": torch.tensor(value) for part, value in rollout.seconds.items()},
    }
    if experience.values is not None and experience.returns is not None:
        metrics["value/explained_variance"] = explained_variance(experience.values, experience.returns, mask)
        metrics["value/mean"] = masked_mean(experience.values, mask)
    return metrics
