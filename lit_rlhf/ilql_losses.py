"""ILQL's math as pure functions (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit
Language Q Learning"): per-token rewards of a scored response, the Q, V, CQL and LM terms, the Polyak update of
the target Q heads, and the perturbation decoding adds to the LM's scores.

Every response token is an action a_t taken in state s_t (the prefix before it); the response's reward r is paid on
its last token, which ends the episode. Averages run over the response tokens of the batch (``mask``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lit_rlhf.rl.advantages import masked_mean


def terminal_rewards(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token rewards and terminal flags of responses rewarded once, at the end: r_t = r and done_t = 1 on each
    row's last response token, 0 elsewhere (a row without response tokens gets neither).

    Shape: rewards (B,), mask (B, T) -> rewards (B, T), done (B, T), float like ``rewards``.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * (mask > 0)).argmax(-1)  # index of the last response token
    done = torch.nn.functional.one_hot(last, mask.shape[-1]).to(rewards.dtype)
    done = done * (mask > 0).any(-1, keepdim=True).to(rewards.dtype)
    return done * rewards.unsqueeze(-1), done


def q_loss(q: Tensor, rewards: Tensor, next_v: Tensor, done: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """TD regression of every Q head onto r_t + γ·V(s_{t+1})·(1 − done_t), summed over heads, each averaged over
    response tokens: Σ_i E[(Q_i(s_t, a_t) − r_t − γ·V(s_{t+1})·(1 − done_t))²] (ILQL's Q loss, taken from IQL,
    Kostrikov et al. 2021). The target is detached: V learns only from its own loss.

    Shape: q (K, B, T) (head i's value of the token taken), rewards, next_v, done, mask (B, T) -> ().
    """
    target = (rewards + gamma * next_v * (1.0 - done)).detach()
    return sum(masked_mean((q_i - target) ** 2, mask) for q_i in q)


def expectile_loss(target_q: Tensor, v: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Expectile regression of V onto the target heads' estimate Q̂(s_t, a_t) = min_i Q̂_i(s_t, a_t) (detached):
    E[|τ − 1(u < 0)|·u²] with u = Q̂ − V (ILQL's V loss, from IQL). τ > 0.5 weighs the actions better than V more,
    so V tends to the value of the best actions the data shows rather than their average.

    Shape: target_q (K, B, T), v (B, T), mask (B, T) -> ().
    """
    u = target_q.min(0).values.detach() - v
    weight = (tau - (u < 0).to(u.dtype)).abs()
    return masked_mean(weight * u**2, mask)


def cql_loss(q_values: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """The conservative term: the cross-entropy of each head's Q(s_t, ·), taken as logits, against the token taken,
    summed over heads: Σ_i E[logsumexp_a Q_i(s_t, a) − Q_i(s_t, a_t)]. It pushes down the values of tokens the data
    did not take, which the TD loss never sees (CQL, Kumar et al. 2020, as ILQL uses it).

    Shape: q_values (K, B, T, V), actions (B, T) long, mask (B, T) -> ().
    """
    taken = q_values.gather(-1, actions.expand(q_values.shape[0], *actions.shape).unsqueeze(-1)).squeeze(-1)
    return sum(masked_mean(ce, mask) for ce in q_values.logsumexp(-1) - taken)


def lm_loss(logits: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """The LM's negative log-likelihood of the response tokens, −E[log π_β(a_t | s_t)]: ILQL keeps fine-tuning the LM
    on the data (the behaviour policy that decoding perturbs); trlx calls it the AWAC term, whose advantage weights
    exp(β_awac·(Q̂ − V)) are 1 with its default β_awac = 0.

    Shape: logits (B, T, V), actions (B, T) long, mask (B, T) -> ().
    """
    logprobs = logits.float().log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return -masked_mean(logprobs, mask)


@torch.no_grad()
def polyak_update(targets: Iterable[Tensor], sources: Iterable[Tensor], alpha: float) -> None:
    """Move each target tensor a share ``alpha`` of the way to its source, in place: θ̂ ← (1 − α)·θ̂ + α·θ.

    Shape: matching tensors of any shape.
    """
    for target, source in zip(targets, sources, strict=True):
        target.lerp_(source.to(target.dtype), alpha)


def perturbed_scores(scores: Tensor, q: Tensor, v: Tensor, beta: float) -> Tensor:
    """ILQL's decoding: π(a | s) ∝ π_β(a | s)·exp(β·(Q(s, a) − V(s))), as scores: the LM's scores plus
    β·(min_i Q_i(s, ·) − V(s)). V(s) shifts a row's scores equally, so it leaves the distribution unchanged.

    Shape: scores (B, V), q (K, B, V), v (B,) -> (B, V); or per position, scores (B, T, V), q (K, B, T, V),
    v (B, T) -> (B, T, V).
    """
    return scores + beta * (q.min(0).values - v.unsqueeze(-1)).to(scores.dtype)
