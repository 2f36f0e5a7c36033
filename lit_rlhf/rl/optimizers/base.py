"""The ``PolicyOptimizer`` contract: what an RL algorithm decides, given only the tensors and the policy it needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from transformers import LogitsProcessor

from lit_rlhf.hparams import Configurable
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.policy import LogitsTransform


@dataclass(frozen=True)
class UpdateSchedule:
    """How often one rollout is used: ``epochs`` passes over ``num_minibatches`` shuffled minibatches, stopped early
    once a minibatch's approximate KL[π_old‖π] exceeds ``target_kl``."""

    epochs: int = 1
    """Passes over each rollout."""
    num_minibatches: int = 1
    """Optimizer steps per pass (the rollout rows are split into this many shuffled minibatches)."""
    target_kl: float | None = None
    """Stop the iteration's update once a minibatch's approximate KL exceeds this; None never stops."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError(f"epochs ({self.epochs}) and num_minibatches ({self.num_minibatches}) must be >= 1.")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 (or null to never stop early), got {self.target_kl}.")


class PolicyOptimizer(Configurable, nn.Module, ABC):
    """What an RL algorithm decides; ``RLHFModule`` does everything else (sampling, scoring, KL, the update loop).

    Implement ``advantages`` and ``loss``; override the other hooks only when needed. Per iteration the module runs
    ``on_iteration_start`` → rollout (sampling through ``logits_processor``, forwards through ``logits_transform``)
    → ``advantages`` → the update of ``schedule``, each minibatch ``loss`` → backward → clip → step.

    A ``PolicyOptimizer`` is an ``nn.Module`` (no ``super().__init__()`` call needed): models or buffers it creates
    in ``setup`` are submodules of the ``RLHFModule``, so Lightning moves, shards and checkpoints them with the rest;
    plain Python state that later iterations depend on goes through ``get_extra_state`` / ``set_extra_state``.
    Hooks receive the policy model and tensors, never the training loop.

    Set these as class or instance attributes:
    """

    needs_critic: bool = False
    """Whether the module must build a value model (``Experience.values`` / ``PolicyOutputs.values``)."""
    schedule: UpdateSchedule = UpdateSchedule()
    """How many optimizer steps each rollout feeds (one by default)."""
    min_samples: int = 1
    """Completions per prompt the algorithm needs (``generation.num_samples``); 2 for baselines from a group."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PolicyOptimizer:
        # Module state exists before the subclass's __init__ runs, so algorithms need not call super().__init__();
        # Configurable records the arguments, so checkpoints describe the algorithm instead of pickling it.
        self = super().__new__(cls, *args, **kwargs)
        nn.Module.__init__(self)
        return self

    def __init__(self) -> None:
        """Nothing to do: ``__new__`` already initialised the ``nn.Module``."""

    @abstractmethod
    def advantages(self, experience: Experience) -> tuple[Tensor, Tensor | None]:
        """Advantages (B, T) and value targets (B, T) or None, from a rollout (no gradients)."""

    @abstractmethod
    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of a minibatch and metrics to log, named in the shared namespace (``policy/loss``,
        ``value/loss``, ``policy/clip_frac`` …)."""

    def setup(self, policy: nn.Module) -> None:
        """Called once with the freshly built policy (a peft model with LoRA); create algorithm-owned models here,
        as attributes (they become submodules)."""
        return None  # optional hook

    def on_iteration_start(self, policy: nn.Module, iteration: int) -> None:
        """Called before each rollout; ``iteration`` counts from 0 and survives checkpoints."""
        return None  # optional hook

    def logits_processor(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> LogitsProcessor | None:
        """A processor applied to the policy's scores at every sampling step of this rollout (prompts (B, P), one
        row per response); None for none."""
        return None

    def logits_transform(
        self, policy: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int
    ) -> LogitsTransform | None:
        """A transform of the policy's response logits for every training forward (old and new log-probs, entropy),
        so they match the distribution ``logits_processor`` sampled from. Called before the policy's forward, without
        gradients. Shapes: sequences (b, P+T), attention_mask (b, P+T)."""
        return None
