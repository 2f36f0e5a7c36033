"""Sampling from a policy: ``make_sampler`` picks the backend (our decoding loop, HF ``generate``, vLLM) and
``PolicyGenerator`` samples, cuts at the stops and scores a policy without any algorithm."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from lit_rlhf.models import LoraOptions, load_tokenizer
from lit_rlhf.rl.decoding import (
    GenerationOptions,
    HFSampler,
    NativeSampler,
    Sampler,
    Suppress,
    cut_at_stop_strings,
    stop_mask,
    stop_string_positions,
    stop_token_ids,
    suppressed_token_ids,
)
from lit_rlhf.rl.experience import Rollout, Samples
from lit_rlhf.rl.optimizers.base import PolicyOptimizer
from lit_rlhf.rl.policy import PolicyModels
from lit_rlhf.rl.scoring import RewardFn, score

if TYPE_CHECKING:
    from lit_rlhf.data.rows import Prompt
    from lit_rlhf.rl.vllm import VLLMOptions


def make_sampler(
    backend: Literal["native", "hf", "vllm"],
    tokenizer: PreTrainedTokenizerBase,
    stop_token_ids: list[int],
    sharded: bool = False,
    vllm: VLLMOptions | None = None,
    model_path: str | None = None,
    lora: LoraOptions | None = None,
    world_size: int = 1,
) -> Sampler:
    """The sampler of a ``rollout_backend``. Weights sharded across processes (FSDP) need ``generate``'s synced
    steps, so ``native`` hands over to ``hf`` there; ``vllm`` starts an engine on ``model_path`` (the policy's
    initial weights), one per process."""
    if backend == "vllm":
        from lit_rlhf.rl.vllm import VLLMOptions, VLLMSampler

        return VLLMSampler(tokenizer, stop_token_ids, model_path, vllm or VLLMOptions(), lora, world_size)
    if backend == "native" and not sharded:
        return NativeSampler(tokenizer, stop_token_ids)
    return HFSampler(tokenizer, stop_token_ids, synced_gpus=sharded)


class PolicyGenerator:
    """Samples a policy and scores the samples, with no algorithm and no training: the pipeline's collect and
    evaluate stages, ``RLHFModule``'s rollouts and users all sample through it.

    Args:
        models: The policy (and the reference, for ``rollout``).
        tokenizer: The policy's tokenizer, left padding.
        options: How to sample.
        reward: Scores completions, ``(prompts, completions) -> (N,)``; needed by ``rollout`` only.
        sampler: The backend; None: our decoding loop (``NativeSampler``).
    """

    def __init__(
        self,
        models: PolicyModels,
        tokenizer: PreTrainedTokenizerBase,
        options: GenerationOptions,
        reward: RewardFn | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.models, self.tokenizer, self.options, self.reward = models, tokenizer, options, reward
        self.stop_token_ids = stop_token_ids(models.policy, tokenizer)
        self.suppressed = torch.tensor(suppressed_token_ids(tokenizer, self.stop_token_ids), dtype=torch.long)
        self.sampler = sampler or NativeSampler(tokenizer, self.stop_token_ids)

    def banned(self, options: GenerationOptions | None = None) -> Tensor | None:
        """The token ids responses may not contain under ``options`` (None: the generator's): the special tokens
        other than the stop tokens, unless ``suppress_special_tokens`` is off; None when there are none."""
        suppress = (options or self.options).suppress_special_tokens
        return self.suppressed if suppress and self.suppressed.numel() else None

    @classmethod
    def load(
        cls, policy: str, options: GenerationOptions, reward: RewardFn | None = None, **models: Any
    ) -> PolicyGenerator:
        """A generator for the policy ``policy`` (bundled name, hub id or path); ``models`` are
        ``PolicyModels.load``'s keyword arguments (``lora``, ``dtype``, ``reference`` ...)."""
        tokenizer = load_tokenizer(policy, padding_side="left")
        return cls(PolicyModels.load(policy, **models).eval(), tokenizer, options, reward)

    @property
    def device(self) -> torch.device:
        return next(self.models.policy.parameters()).device

    def finish(self, response_ids: Tensor, options: GenerationOptions) -> tuple[Tensor, Tensor, list[str]]:
        """Stop mask, stopped flags and completion texts of sampled responses.

        Shape: (B, T) -> (B, T) float, (B,) bool, B strings.
        """
        is_stop = torch.isin(response_ids, torch.tensor(self.stop_token_ids, device=response_ids.device))
        if options.stop_strings:
            ends = stop_string_positions(self.tokenizer, response_ids.cpu(), options.stop_strings)
            rows = (ends >= 0).nonzero().flatten()
            is_stop[rows.to(is_stop.device), ends[rows].to(is_stop.device)] = True
        mask, stopped = stop_mask(is_stop)
        lengths = mask.sum(-1).long().tolist()
        texts = [
            cut_at_stop_strings(self.tokenizer.decode(ids[:n], skip_special_tokens=True), options.stop_strings)
            for ids, n in zip(response_ids.tolist(), lengths, strict=True)
        ]
        return mask, stopped, texts

    @torch.no_grad()
    def samples(
        self,
        prompts: Sequence[str],
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        options: GenerationOptions | None = None,
        make_processor: Callable[[Tensor, Tensor], LogitsProcessor | None] | None = None,
    ) -> Samples:
        """``num_samples`` responses to each prompt, in adjacent rows. ``make_processor(prompt_ids, prompt_mask)``
        (an algorithm's hook) builds, for the repeated rows, a processor of the scores at every decoding step.

        Shape: prompt_ids, prompt_mask (b, P) -> Samples of B = b × num_samples rows.
        """
        options = options or self.options
        k = options.num_samples
        group = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(k)
        prompts = [p for p in prompts for _ in range(k)]
        if k > 1:
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        processor = make_processor(prompt_ids, prompt_mask) if make_processor is not None else None
        if (banned := self.banned(options)) is not None:
            processor = Suppress(banned, processor)
        sequences = self.sampler.sample(self.models.policy, prompt_ids, prompt_mask, options, processor)
        response_ids = sequences[:, prompt_ids.shape[1] :]
        response_mask, stopped, completions = self.finish(response_ids, options)
        return Samples(prompts, prompt_ids, prompt_mask, response_ids, response_mask, stopped, completions, group)

    @torch.no_grad()
    def rollout(
        self, batch: dict[str, Any], algorithm: PolicyOptimizer | None = None, keep_graph: bool = False
    ) -> Rollout:
        """Sample one ``PromptDataModule`` batch, score the completions with ``reward`` and run the policy's and the
        reference's forwards on them.

        With ``algorithm``, its logits processor shapes the sampling, its logits transform the policy's forward, and
        the critic's values come too; without, the plain policy is sampled (evaluation). ``keep_graph=True`` runs the
        policy's forward with autograd on and returns it as ``Rollout.graph`` for an update whose first pass sees the
        same weights.
        """
        policy, prompt_ids, prompt_mask = self.models.policy, batch["input_ids"], batch["attention_mask"]
        clock = time.perf_counter()
        make_processor = partial(algorithm.logits_processor, policy) if algorithm is not None else None
        samples = self.samples(batch["prompt"], prompt_ids, prompt_mask, make_processor=make_processor)
        seconds = {"generate": time.perf_counter() - clock}
        clock = time.perf_counter()
        raw = score(self.reward, samples.prompts, samples.completions).to(prompt_ids.device)
        seconds["score"] = time.perf_counter() - clock
        clock = time.perf_counter()
        sequences, attention_mask, length = samples.sequences, samples.attention_mask, prompt_ids.shape[1]
        temperature = self.options.logprob_temperature
        transform = None
        if algorithm is not None:
            transform = algorithm.logits_transform(policy, sequences, attention_mask, length)
        banned = self.banned()
        with torch.enable_grad() if keep_graph else nullcontext():
            graph = self.models.outputs(
                sequences, attention_mask, length, temperature, transform, algorithm is not None, banned
            )
        ref_logprobs = self.models.reference_logprobs(sequences, attention_mask, length, temperature, banned)
        seconds["forward"] = time.perf_counter() - clock
        return Rollout(samples, raw, graph.detach(), ref_logprobs, seconds, graph if keep_graph else None)

    def encode(
        self,
        prompts: Sequence[Prompt | str],
        chat_template: bool = True,
        system_prompt: str | None = None,
        max_prompt_length: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Raw prompts (texts, or ``Prompt`` rows with their messages) encoded as ``PromptDataModule`` encodes them,
        left-padded, on the policy's device.

        Shape: N prompts -> ids (N, P) long, mask (N, P).
        """
        from lit_rlhf.data.encoding import encode_prompt, pad_left

        ids = [encode_prompt(self.tokenizer, p, max_prompt_length, chat_template, system_prompt) for p in prompts]
        prompt_ids, prompt_mask = pad_left(ids, self.tokenizer.pad_token_id)
        return prompt_ids.to(self.device), prompt_mask.to(self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        options: GenerationOptions | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        max_prompt_length: int = 256,
        batch_size: int = 16,
    ) -> list[str]:
        """Completions for raw prompt texts, encoded as ``PromptDataModule`` does; ``num_samples`` completions per
        prompt, adjacent."""
        completions: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            prompt_ids, prompt_mask = self.encode(chunk, chat_template, system_prompt, max_prompt_length)
            completions += self.samples(chunk, prompt_ids, prompt_mask, options).completions
        return completions
