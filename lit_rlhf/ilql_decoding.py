"""ILQL decoding: a transformers ``LogitsProcessor`` that perturbs the LM's scores by β·(Q − V), and the
``make_processor`` factory that plugs it into ``PolicyGenerator.samples`` from an exported folder or a module."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor

from lit_rlhf.ilql_heads import QVHeads, load_heads
from lit_rlhf.ilql_losses import perturbed_scores
from lit_rlhf.models import load_causal_lm
from lit_rlhf.rl.policy import position_ids

MakeProcessor = Callable[[Tensor, Tensor], LogitsProcessor]
"""``(prompt_ids, prompt_mask) -> processor``, what ``PolicyGenerator.samples(make_processor=...)`` takes."""


class ILQLLogitsProcessor(LogitsProcessor):
    """Adds β·(min_i Q_i(s, ·) − V(s)) to the scores of each decoding step, s the sequence so far
    (:func:`~lit_rlhf.ilql_losses.perturbed_scores`).

    The heads read ``model``'s last hidden state of s, which the processor computes with its own forward and KV
    cache, whatever sampler calls it: each call feeds only the tokens added since the last one (one token per step),
    and a call with a sequence no longer than the last starts over from the prompt. Positions and the attention mask
    follow the left-padded prompt; tokens after it all count as real, as the samplers treat them.

    ``__call__``: input_ids (B, L) (the prompt and the tokens sampled so far), scores (B, V) -> (B, V).

    Args:
        model: The causal LM the heads were trained on (an exported ILQL folder's LM).
        heads: The Q heads and V head to read (those ``ILQLModule.decoding_heads`` gives or ``load_heads`` loads).
        beta: Scale of the perturbation; 0 leaves the scores as they are.
        prompt_ids: The prompts decoding starts from, left-padded. Shape: (B, P).
        prompt_mask: Their attention mask. Shape: (B, P).
    """

    def __init__(self, model: nn.Module, heads: QVHeads, beta: float, prompt_ids: Tensor, prompt_mask: Tensor):
        if beta < 0:
            raise ValueError(f"ILQL decoding needs beta >= 0, got {beta}.")
        self.model, self.heads, self.beta = model, heads, beta
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.cache: Any = None
        self.length = 0  # tokens of the sequence the cache holds

    def _mask(self, length: int) -> Tensor:
        """The attention mask of a sequence of ``length`` tokens. Shape: (B, length)."""
        new = self.prompt_mask.new_ones(self.prompt_mask.shape[0], max(0, length - self.prompt_mask.shape[1]))
        return torch.cat([self.prompt_mask, new], dim=1)[:, :length]

    @torch.no_grad()
    def hidden(self, input_ids: Tensor) -> Tensor:
        """The model's last hidden state at the end of ``input_ids``, through the cache.

        Shape: (B, L) -> (B, H).
        """
        prompt_length, length = self.prompt_ids.shape[1], input_ids.shape[1]
        if length <= self.length:
            self.cache, self.length = None, 0
        if self.length == 0 and (
            length < prompt_length or not torch.equal(input_ids[:, :prompt_length], self.prompt_ids)
        ):
            raise ValueError(
                "ILQLLogitsProcessor: the sequences do not start with the prompts it was built for; build one per "
                "batch of prompts (make_processor(prompt_ids, prompt_mask))."
            )
        mask = self._mask(length)
        out = self.model(
            input_ids=input_ids[:, self.length :],
            attention_mask=mask,
            position_ids=position_ids(mask)[:, self.length :],
            cache=self.cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        self.cache, self.length = out.cache, length
        return out.hidden_states[-1][:, -1]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        hidden = self.hidden(input_ids)
        with torch.no_grad():
            q, v = self.heads.q_values(hidden), self.heads.values(hidden)
        if q.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"ILQLLogitsProcessor: the Q heads score {q.shape[-1]} tokens but the sampler's scores have "
                f"{scores.shape[-1]}; decode with the LM the heads were trained on."
            )
        return perturbed_scores(scores, q, v, self.beta)


def make_ilql_processor(
    source: str | Path | nn.Module, beta: float | None = None, model: nn.Module | None = None
) -> MakeProcessor:
    """The ``make_processor`` factory of ILQL decoding, for ``PolicyGenerator.samples`` (or ``sample`` /
    ``NativeSampler`` through a generator): each batch of prompts gets its own :class:`ILQLLogitsProcessor`.

    Args:
        source: An exported ILQL folder (the LM with ``ilql_heads.safetensors`` / ``ilql_heads.json`` beside it), or
            an ``ILQLModule``.
        beta: Scale of the perturbation; None takes the one saved with the heads (``ILQLModule``'s ``beta``).
        model: The LM the processor runs to get hidden states; None loads the folder's LM (or takes the module's).
            Pass the generator's policy when it is that same LM, to hold its weights once.
    """
    if isinstance(source, (str, Path)):
        heads, saved_beta = load_heads(source)
        model = model if model is not None else load_causal_lm(str(source)).eval()
    else:
        heads, saved_beta = source.decoding_heads(), float(source.hparams.beta)
        model = model if model is not None else source.model
    heads.to(next(model.parameters()).device)
    return partial(ILQLLogitsProcessor, model, heads, saved_beta if beta is None else beta)


class ILQLDecoding:
    """ILQL decoding as the two hooks ``PolicyGenerator.rollout(batch, algorithm)`` takes from an algorithm, so that a
    rollout samples from π(a | s) ∝ π_β(a | s)·exp(β·(Q(s, a) − V(s))) and its log-probs (and so its KL to the
    reference) are those of that distribution, not of the LM alone: the pipeline measures ILQL as it measures any
    policy. The policy sampled must be the LM the heads were trained on. Exact at sampling temperature 1 (the
    processor acts before the temperature, the transform after it).

    Args:
        heads: The Q heads and V head (``ILQLModule.decoding_heads`` or ``load_heads``).
        beta: Scale of the perturbation; 0 is the LM alone.
    """

    def __init__(self, heads: QVHeads, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"ILQL decoding needs beta >= 0, got {beta}.")
        self.heads, self.beta = heads, beta

    def logits_processor(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> LogitsProcessor:
        """An :class:`ILQLLogitsProcessor` over ``policy`` for these prompts. Shape: (B, P)."""
        return ILQLLogitsProcessor(policy, self.heads, self.beta, prompt_ids, prompt_mask)

    @torch.no_grad()
    def logits_transform(
        self, policy: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int
    ) -> Callable[[Tensor], Tensor]:
        """Adds β·(min_i Q_i − V) at every response position to the policy's response logits.

        Shape: sequences, attention_mask (B, P+T) -> a map of logits (B, T, V) to (B, T, V).
        """
        out = policy(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        hidden = out.hidden_states[-1][:, prompt_length - 1 : -1]
        q = self.heads.q_values(hidden).min(0, keepdim=True).values  # (1, B, T, V): one head's worth kept
        v = self.heads.values(hidden)
        return lambda logits: perturbed_scores(logits, q, v, self.beta)
