"""From text to rewards: calling the reward under its contract, shaping the scores (penalty, normalisation,
clipping), and the KL-penalised per-token rewards of an ``Experience``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_rlhf.rl.experience import Experience, Rollout
from lit_rlhf.rl.kl import KLEstimator, kl_estimate

RewardFn = Callable[[list[str], list[str]], Any]
"""A reward: ``(prompts, completions) -> Tensor | list[float]`` of shape (N,), one score per completion."""


def reward_name(reward: Any) -> str:
    """How errors name a reward: a function by its import path, an object by its class (and its repr when short)."""
    if hasattr(reward, "__qualname__"):
        return f"{getattr(reward, '__module__', '?')}.{reward.__qualname__}"
    text = repr(reward)
    name = type(reward).__name__
    return text if len(text) <= 80 and not text.startswith("<") else name


def score(reward: RewardFn | None, prompts: list[str], completions: list[str]) -> Tensor:
    """Call ``reward`` and check what it returned: one finite number per completion, as a 1-D tensor or list
    ((N, 1) is taken as (N,)). Errors name the reward and show what it returned.

    Shape: N prompts, N completions -> (N,) float32 on the CPU or the reward's device.
    """
    if reward is None:
        raise RuntimeError("RLHFModule has no reward: set model.reward (a class_path or a function's import path).")
    out = reward(prompts, completions)
    name, n = reward_name(reward), len(completions)
    if isinstance(out, Tensor):
        if out.is_complex() or out.dtype == torch.bool:
            raise TypeError(f"reward {name} returned a {out.dtype} tensor; it must return one float per completion.")
        scores = out.detach().float()
    else:
        try:
            scores = torch.as_tensor(out, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            shown = repr(out)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise TypeError(
                f"reward {name} returned {shown} ({type(out).__name__}) for {n} completions; it must return one "
                "float per completion (a 1-D tensor or a list of numbers)."
            ) from None
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores.squeeze(1)
    if tuple(scores.shape) != (n,):
        raise ValueError(
            f"reward {name} returned shape {tuple(scores.shape)} for {n} completions; it must return one score per "
            "completion (a 1-D tensor or list)."
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"reward {name} returned non-finite scores: {scores.tolist()}.")
    return scores


class RunningMoments:
    """Running mean and standard deviation of all values seen (Chan et al.'s parallel update), checkpointable."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, values: Tensor) -> None:
        """Fold a batch of values, shape (N,), into the running statistics."""
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return self.var**0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


class RewardShaping:
    """What happens to the reward's scores before they become rewards, in this order: a penalty for responses
    without a stop, standardisation by running moments of every score seen, clipping.

    Args:
        missing_eos_penalty: Subtracted from the score of responses that hit ``max_new_tokens`` without a stop.
        normalize: Standardise scores with the running mean and std of all scores seen so far.
        clip: Clip scores to [-clip, clip] (after normalisation); None disables.
    """

    def __init__(self, missing_eos_penalty: float | None = None, normalize: bool = False, clip: float | None = None):
        if clip is not None and clip <= 0:
            raise ValueError(f"reward_clip must be > 0 (or null to disable), got {clip}.")
        self.missing_eos_penalty, self.normalize, self.clip = missing_eos_penalty, normalize, clip
        self.moments = RunningMoments()

    def __call__(self, raw: Tensor, stopped: Tensor, gather: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
        """Shaped scores. ``gather`` collects the scores of every process, so all normalise alike.

        Shape: raw (B,), stopped (B,) bool -> (B,).
        """
        scores = raw.clone()
        if self.missing_eos_penalty:
            scores = scores - self.missing_eos_penalty * (~stopped).float()
        if self.normalize:
            self.moments.update(gather(scores).flatten())
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-8)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last kept token of each row (masks keep a prefix).

    Shape: (B, T) -> (B,) long.
    """
    return (mask.sum(-1).long() - 1).clamp(min=0)


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards r_t = -β·kl_t, plus the sequence score on the last response token.

    This is the reward of Ziegler et al. 2019 (eq. 2), R = r(x, y) - β·log(π(y|x) / ρ(y|x)), spread over tokens.

    Shape: scores (B,), kl (B, T), mask (B, T) -> (B, T), zero after the last response token.
    """
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def to_experience(rollout: Rollout, scores: Tensor, kl_estimator: KLEstimator, kl_coef: float) -> Experience:
    """The ``Experience`` of a rollout whose shaped sequence scores are ``scores`` (B,): per-token KL against the
    reference with ``kl_estimator`` and rewards -β·kl_t plus the score on the last token (β = ``kl_coef``)."""
    samples, outputs = rollout.samples, rollout.outputs
    mask = samples.response_mask
    kl = kl_estimate(outputs.logprobs, rollout.ref_logprobs, kl_estimator) * mask
    return Experience(
        prompt_ids=samples.prompt_ids,
        prompt_mask=samples.prompt_mask,
        response_ids=samples.response_ids,
        response_mask=mask,
        logprobs=outputs.logprobs,
        ref_logprobs=rollout.ref_logprobs,
        values=outputs.values,
        scores=scores,
        kl=kl,
        rewards=kl_penalized_rewards(scores, kl, mask, kl_coef),
        group=samples.group,
        kl_coef=kl_coef,
    )
