"""The data that crosses the RL code's boundaries: sampled ``Samples``, scored ``Rollout``, the algorithm's
``Experience`` and the policy's ``PolicyOutputs``, each field documented by shape."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def _select(value, index: Tensor):
    """Rows ``index`` of a tensor or of a list (texts); anything else unchanged."""
    if isinstance(value, Tensor):
        return value[index]
    if isinstance(value, list):
        return [value[i] for i in index.tolist()]
    return value


class PromptAndResponse:
    """The two views of a batch with ``prompt_ids`` / ``prompt_mask`` (B, P) and ``response_ids`` / ``response_mask``
    (B, T) that every forward takes."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor

    @property
    def sequences(self) -> Tensor:
        """(B, P+T) prompt and response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, P+T) attention mask: the prompt's, then the response mask."""
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)


@dataclass(frozen=True)
class Samples(PromptAndResponse):
    """Responses sampled for a batch of left-padded prompts; B = prompts × samples per prompt."""

    prompts: list[str]
    """B prompt texts (each repeated ``num_samples`` times), as the reward sees them."""
    prompt_ids: Tensor
    """(B, P) long, left-padded prompts."""
    prompt_mask: Tensor
    """(B, P) attention mask of the prompts."""
    response_ids: Tensor
    """(B, T) long sampled tokens; padding after the first stop."""
    response_mask: Tensor
    """(B, T) float, 1 up to and including the first stop token (EOS or stop string), 0 after."""
    stopped: Tensor
    """(B,) bool: the response ended with EOS or a stop string (not by running out of ``max_new_tokens``)."""
    completions: list[str]
    """B completion texts (special tokens dropped, cut before any stop string), as the reward sees them."""
    group: Tensor
    """(B,) long index of the prompt each row answers (rows of one prompt are adjacent and share it)."""

    def select(self, index: Tensor) -> Samples:
        """The rows ``index`` (shape (b,) long) of every field, texts included."""
        return dataclasses.replace(
            self, **{f.name: _select(getattr(self, f.name), index) for f in dataclasses.fields(self)}
        )


class PolicyOutputs(NamedTuple):
    """The policy's forward on a batch of sampled responses, shapes (b, T)."""

    logprobs: Tensor
    """(b, T) log-probs of the sampled tokens under the current policy (after any logits transform)."""
    entropy: Tensor
    """(b, T) entropy of the current policy's next-token distribution."""
    values: Tensor | None
    """(b, T) current critic values; None without a critic."""

    def select(self, index: Tensor) -> PolicyOutputs:
        """The rows ``index`` (shape (b,) long) of every tensor, gradients kept (as ``Experience.select``)."""
        return PolicyOutputs(*(_select(t, index) for t in self))

    def detach(self) -> PolicyOutputs:
        """The same tensors without their autograd graph."""
        return PolicyOutputs(*(t.detach() if t is not None else None for t in self))


class Rollout(NamedTuple):
    """A sampled and scored batch with the policy's and the reference's log-probs: what every algorithm (and any
    evaluation) starts from, before rewards are shaped into ``Experience``."""

    samples: Samples
    """What was sampled."""
    raw_scores: Tensor
    """(B,) what the reward returned."""
    outputs: PolicyOutputs
    """The policy's forward on the samples, detached (B, T)."""
    ref_logprobs: Tensor
    """(B, T) log-probs of the sampled tokens under the frozen reference."""
    seconds: dict[str, float]
    """Wall time of the rollout's parts: ``generate`` (sampling), ``score`` (the reward call), ``forward`` (the
    policy, reference and critic forwards)."""
    graph: PolicyOutputs | None = None
    """With ``keep_graph``: ``outputs`` with their autograd graph, for an update whose first pass reuses them."""


@dataclass
class Experience(PromptAndResponse):
    """One iteration's rollout, row-aligned; B = prompts × ``num_samples``, P = prompt length, T = response length.

    Rows select as a unit (``experience.select(index)``) for minibatches.
    """

    prompt_ids: Tensor
    """(B, P) long, left-padded prompts."""
    prompt_mask: Tensor
    """(B, P) attention mask of the prompts."""
    response_ids: Tensor
    """(B, T) long sampled tokens; padding after the first stop."""
    response_mask: Tensor
    """(B, T) float, 1 up to and including the first stop token (EOS or stop string), 0 after."""
    logprobs: Tensor
    """(B, T) log-probs of the sampled tokens under the sampling policy π_old (after any logits transform)."""
    ref_logprobs: Tensor
    """(B, T) log-probs of the sampled tokens under the frozen reference."""
    values: Tensor | None
    """(B, T) critic values V(s_t) of the state before each response token; None without a critic."""
    scores: Tensor
    """(B,) sequence scores after penalty, normalisation and clipping (what the reward contributes)."""
    kl: Tensor
    """(B, T) per-token KL estimate against the reference (zero after the stop)."""
    rewards: Tensor
    """(B, T) per-token rewards: -β·kl_t, plus the score on the last response token."""
    group: Tensor
    """(B,) long index of the prompt each row answers (rows of one prompt share it)."""
    advantages: Tensor | None = None
    """(B, T) set by ``PolicyOptimizer.advantages``."""
    returns: Tensor | None = None
    """(B, T) value targets set by ``PolicyOptimizer.advantages``; None when there is no critic."""
    kl_coef: float = 0.0
    """β of this iteration's KL penalty in ``rewards`` (for algorithms that put the KL in their loss instead)."""

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    def select(self, index: Tensor) -> Experience:
        """The rows ``index`` (shape (b,) long) of every tensor field."""
        return dataclasses.replace(
            self, **{f.name: _select(getattr(self, f.name), index) for f in dataclasses.fields(self)}
        )
