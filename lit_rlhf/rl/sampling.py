"""The rollout's own decoding loop: the model's forward with its KV cache, transformers' logits processors and stop
criteria, and a sampler that draws by inverse CDF (``rollout_backend: native``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lit_rlhf.rl.rollout import GenerationOptions, position_ids


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
