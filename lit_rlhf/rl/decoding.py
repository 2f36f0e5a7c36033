"""Decoding responses from a causal LM: ``GenerationOptions``, our KV-cache decoding loop with transformers' logits
processors and inverse-CDF draws, where responses stop (stop tokens, stop strings), and the ``Sampler`` interface with
its native and HF backends (``lit_rlhf.rl.vllm`` adds the third)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lit_rlhf.rl.policy import position_ids


@dataclass(frozen=True)
class GenerationOptions:
    """How responses are sampled from the policy.

    The training forwards divide the logits by ``temperature`` so that log-probs match the sampling distribution;
    ``top_k`` / ``top_p`` truncation is not reproduced there, so keep them off (0 / 1.0) for on-policy updates.
    """

    max_new_tokens: int = 32
    """Longest response in tokens; responses that reach it without a stop are "truncated"."""
    temperature: float = 1.0
    """Softmax temperature for sampling (and for the log-probs of training forwards)."""
    top_k: int = 0
    """Sample only from the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens with this much probability; 1.0 disables."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end a response besides the EOS token; the completion text is cut before them."""
    num_samples: int = 1
    """Responses sampled per prompt; rows of one prompt are adjacent and share a ``group`` id."""
    suppress_special_tokens: bool = True
    """Never sample special tokens other than the stop tokens (``<unk>``, padding, chat markup such as
    ``<|im_start|>``), and leave them out of log-probs and KL too. Completion texts drop special tokens before the
    reward sees them, so without this a policy can be paid for text that is not there (empty-looking answers of
    ``<unk>`` earned the top score under NLPO)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}; use do_sample: false.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if self.num_samples < 1:
            raise ValueError(f"generation.num_samples must be >= 1, got {self.num_samples}.")

    @property
    def logprob_temperature(self) -> float:
        """What the training forwards divide the logits by: ``temperature`` when sampling, 1 for greedy decoding."""
        return self.temperature if self.do_sample else 1.0

    def to_hf(self, eos_token_id: list[int], pad_token_id: int) -> GenerationConfig:
        """A complete ``GenerationConfig``: every field is set so the model's own generation defaults never leak in."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature if self.do_sample else 1.0,
            top_k=self.top_k if self.do_sample else 0,
            top_p=self.top_p if self.do_sample else 1.0,
            stop_strings=list(self.stop_strings) or None,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
        )


def warpers(options: GenerationOptions) -> LogitsProcessorList:
    """The temperature / top-k / top-p warpers ``generate`` applies for these options, in its order."""
    out = LogitsProcessorList()
    if not options.do_sample:
        return out
    if options.temperature != 1.0:
        out.append(TemperatureLogitsWarper(options.temperature))
    if options.top_k > 0:
        out.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1.0:
        out.append(TopPLogitsWarper(options.top_p))
    return out


def draw(scores: Tensor) -> Tensor:
    """One token per row from ``softmax(scores)`` by inverse CDF: the first token whose cumulative probability
    exceeds ``u ~ U[0, total)``.

    ``torch.multinomial`` (what ``generate`` uses) draws one exponential variate per vocabulary entry; over a 49k
    vocabulary that is ~6 ms per decoding step on a CPU, more than a tenth of a step of a 135M model. Here: one
    uniform per row and a float64 cumulative sum. Tokens of probability 0 (scores of -inf) occupy an empty interval
    and are never drawn.

    Shape: (B, V) -> (B,) long.
    """
    cdf = scores.float().softmax(-1).double().cumsum(-1)
    u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=scores.shape[-1] - 1)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    options: GenerationOptions,
    stop_token_ids: list[int],
    pad_token_id: int,
    processor: LogitsProcessor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Tensor:
    """Sample (or greedily decode) responses to left-padded prompts, as ``model.generate`` does.

    Rows that have stopped (a stop token, or a stop string, which needs ``tokenizer``) continue with
    ``pad_token_id``; decoding ends when every row has stopped or after ``max_new_tokens``. ``processor`` (an
    algorithm's, e.g. NLPO's mask) sees the sequences so far and the float32 scores before the warpers, as in
    ``generate``. Greedy decoding returns exactly what ``generate`` returns.

    Shape: prompt_ids, prompt_mask (B, P) -> sequences (B, P+T), T <= max_new_tokens.
    """
    if options.stop_strings and tokenizer is None:
        raise ValueError("generation.stop_strings need the tokenizer: pass sample(..., tokenizer=...).")
    batch, length = prompt_ids.shape
    processors = LogitsProcessorList([processor] if processor is not None else [])
    processors.extend(warpers(options))
    stop_strings = StopStringCriteria(tokenizer, options.stop_strings) if options.stop_strings else None
    stops = torch.tensor(stop_token_ids, device=prompt_ids.device)
    sequences = prompt_ids.new_full((batch, length + options.max_new_tokens), pad_token_id)
    sequences[:, :length] = prompt_ids
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, options.max_new_tokens)], dim=1)
    positions = position_ids(prompt_mask)
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    for t in range(options.max_new_tokens):
        if t > 0:  # the prompt's forward gave the first step's logits
            out = model(
                input_ids=sequences[:, length + t - 1 : length + t],
                attention_mask=attention_mask[:, : length + t],
                position_ids=positions[:, -1:] + t,
                cache=out.cache,
                use_cache=True,
            )
        scores = processors(sequences[:, : length + t], out.logits[:, -1].float())
        token = draw(scores) if options.do_sample else scores.argmax(-1)
        sequences[:, length + t] = token.masked_fill(done, pad_token_id)
        done |= torch.isin(sequences[:, length + t], stops)
        if stop_strings is not None:
            done |= stop_strings(sequences[:, : length + t + 1], scores)
        if bool(done.all()):
            return sequences[:, : length + t + 1]
    return sequences


def stop_mask(is_stop: Tensor) -> tuple[Tensor, Tensor]:
    """Keep every token up to and including the first stop; mask everything after it.

    The stop token itself stays in the mask: choosing to stop is an action the policy is trained on.

    Shape: is_stop (B, T) bool -> mask (B, T) float, stopped (B,) bool (a stop occurred).
    """
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()
    return (stops_before == 0).float(), is_stop.any(-1)


def stop_string_positions(tokenizer: PreTrainedTokenizerBase, response_ids: Tensor, stop_strings: list[str]) -> Tensor:
    """Index of the token that completes the first stop string in each response, or -1.

    Found by bisection on decoded prefixes (a prefix's text only grows), so it needs O(log T) decodes per row.

    Shape: response_ids (B, T) -> (B,) long.
    """
    out = torch.full((response_ids.shape[0],), -1, dtype=torch.long)
    if not stop_strings:
        return out
    for row, ids in enumerate(response_ids.tolist()):

        def contains(n: int, ids=ids) -> bool:
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            return any(s in text for s in stop_strings)

        if not contains(len(ids)):
            continue
        lo, hi = 1, len(ids)  # the smallest prefix length n with a stop string in decode(ids[:n])
        while lo < hi:
            mid = (lo + hi) // 2
            if contains(mid):
                hi = mid
            else:
                lo = mid + 1
        out[row] = lo - 1
    return out


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def suppressed_token_ids(tokenizer: PreTrainedTokenizerBase, stop_token_ids: list[int]) -> list[int]:
    """The special tokens a response may not contain: every special or added-special token of ``tokenizer`` except
    the stop tokens, which end a response."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(special - set(stop_token_ids))


class Suppress(LogitsProcessor):
    """Sets the scores of ``token_ids`` to -inf at every decoding step, before ``then`` (an algorithm's processor),
    if any. ``__call__``: input_ids (B, L), scores (B, V) -> (B, V)."""

    def __init__(self, token_ids: Tensor, then: LogitsProcessor | None = None) -> None:
        self.token_ids, self.then = token_ids, then

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.index_fill(-1, self.token_ids.to(scores.device), float("-inf"))
        return self.then(input_ids, scores) if self.then is not None else scores


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and every EOS of the model's generation config."""
    config_eos = model.generation_config.eos_token_id
    config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    return sorted({tokenizer.eos_token_id, *config_eos} - {None})


class Sampler(ABC):
    """Turns left-padded prompts into sampled sequences; one subclass per backend.

    Args:
        tokenizer: The policy's tokenizer (its pad id fills finished rows; stop strings are matched on its text).
        stop_token_ids: Tokens that end a response.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: list[int]) -> None:
        self.tokenizer, self.stop_token_ids = tokenizer, stop_token_ids

    @abstractmethod
    def sample(
        self,
        policy: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        options: GenerationOptions,
        processor: LogitsProcessor | None = None,
    ) -> Tensor:
        """Sequences of prompts and responses; responses are padded after their stop.

        Shape: prompt_ids, prompt_mask (B, P) -> (B, P+T), T <= ``options.max_new_tokens``.
        """

    def refresh(self, policy: nn.Module) -> None:
        """Called after every update: a backend that holds its own copy of the weights takes the new ones."""
        return None

    def released(self) -> Any:
        """A context during which the backend may give its memory back (the update runs inside it)."""
        return nullcontext()


class NativeSampler(Sampler):
    """Our decoding loop (``lit_rlhf.rl.decoding.sample``): the model's KV cache, transformers' logits processors
    and stop criteria, inverse-CDF draws; faster than ``generate`` on a CPU, same distribution, same greedy output."""

    def sample(self, policy, prompt_ids, prompt_mask, options, processor=None) -> Tensor:
        pad = self.tokenizer.pad_token_id
        return sample(policy, prompt_ids, prompt_mask, options, self.stop_token_ids, pad, processor, self.tokenizer)


class HFSampler(Sampler):
    """transformers' ``generate``.

    Args:
        synced_gpus: Under FSDP every decoding step all-gathers each layer's shards, so all ranks must run the same
            number of steps: those that finish early keep stepping until the last one is done.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: list[int], synced_gpus: bool = False):
        super().__init__(tokenizer, stop_token_ids)
        self.synced_gpus = synced_gpus

    def sample(self, policy, prompt_ids, prompt_mask, options, processor=None) -> Tensor:
        return policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=options.to_hf(self.stop_token_ids, self.tokenizer.pad_token_id),
            logits_processor=LogitsProcessorList([processor]) if processor is not None else None,
            tokenizer=self.tokenizer if options.stop_strings else None,
            synced_gpus=self.synced_gpus,
        )
