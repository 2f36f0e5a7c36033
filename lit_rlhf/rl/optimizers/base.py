"""The ``PolicyOptimizer`` contract between ``RLHFModule`` (the shared rollout/update loop) and an RL algorithm."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from transformers import LogitsProcessor

if TYPE_CHECKING:
    from lit_rlhf.rl.module import RLHFModule


@dataclass
class Experience:
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

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def sequences(self) -> Tensor:
        """(B, P+T) prompt and response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, P+T) attention mask: the prompt's, then the response mask."""
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    def select(self, index: Tensor) -> Experience:
        """The rows ``index`` (shape (b,) long) of every tensor field."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name)[index]
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )


class PolicyOutputs(NamedTuple):
    """The current policy's forward on a minibatch (with gradients), shapes (b, T)."""

    logprobs: Tensor
    """(b, T) log-probs of the sampled tokens under the current policy (after any logits transform)."""
    entropy: Tensor
    """(b, T) entropy of the current policy's next-token distribution."""
    values: Tensor | None
    """(b, T) current critic values; None without a critic."""

    def select(self, index: Tensor) -> PolicyOutputs:
        """The rows ``index`` (shape (b,) long) of every tensor, gradients kept (as ``Experience.select``)."""
        return PolicyOutputs(*(t[index] if t is not None else None for t in self))

    def detach(self) -> PolicyOutputs:
        """The same tensors without their autograd graph."""
        return PolicyOutputs(*(t.detach() if t is not None else None for t in self))


LogitsTransform = Callable[[Tensor], Tensor]
"""Maps response logits (b, T, V) to the logits that log-probs, ratio and entropy use."""


class PolicyOptimizer(ABC):
    """What an RL algorithm decides; ``RLHFModule`` does everything else (sampling, scoring, KL, the update loop).

    Implement ``advantages`` and ``loss``; override the hooks only when needed. The module runs, per iteration:
    ``on_iteration_start`` → rollout (with ``logits_processor``) → ``advantages`` → ``epochs`` passes over
    ``num_minibatches`` shuffled minibatches, each ``loss`` → backward → clip → step, stopping early once the
    minibatch's approximate KL exceeds ``target_kl``. Checkpoints store ``state_dict()``.

    Set these as class or instance attributes:
    """

    needs_critic: bool = False
    """Whether the module must build a value model (``Experience.values`` / ``PolicyOutputs.values``)."""
    epochs: int = 1
    """Passes over each rollout."""
    num_minibatches: int = 1
    """Optimizer steps per pass (the rollout is split into this many shuffled minibatches)."""
    target_kl: float | None = None
    """Stop the iteration's update once a minibatch's approx KL[π_old‖π] exceeds this; None never stops."""

    @abstractmethod
    def advantages(self, experience: Experience) -> tuple[Tensor, Tensor | None]:
        """Advantages (B, T) and value targets (B, T) or None, from a rollout (no gradients)."""

    @abstractmethod
    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of a minibatch and metrics to log, named in the shared namespace (``policy/loss``,
        ``value/loss``, ``policy/clip_frac`` …)."""

    def bind(self, module: RLHFModule) -> None:
        """Called once when ``module`` has built its models; create algorithm-owned state here."""
        return None  # optional hook

    def on_iteration_start(self, module: RLHFModule, iteration: int) -> None:
        """Called before each rollout; ``iteration`` counts from 0 and survives checkpoints."""
        return None  # optional hook

    def logits_processor(self, module: RLHFModule, prompt_ids: Tensor, prompt_mask: Tensor) -> LogitsProcessor | None:
        """A processor applied to the policy's logits while sampling this rollout (prompts (B, P)); None for none."""
        return None

    def logits_transform(
        self, module: RLHFModule, sequences: Tensor, attention_mask: Tensor, prompt_length: int
    ) -> LogitsTransform | None:
        """A transform of the policy's response logits for every training forward (old and new log-probs, entropy),
        so they match the distribution ``logits_processor`` sampled from. Called before the policy's forward, without
        gradients. Shapes: sequences (b, P+T), attention_mask (b, P+T)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state that later iterations depend on (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        return None  # optional hook
