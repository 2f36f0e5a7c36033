"""Rollout math: generation options, response log-probs and entropy, stop masks, KL-penalised per-token rewards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationOptions:
    """How rollouts are sampled from the policy (HF ``generate`` with its KV cache).

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


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as HF ``generate`` computes them.

    Shape: (B, L) mask -> (B, L) long.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_forward(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    output_hidden_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits (and last hidden states) at the positions that predict each response token.

    Position ``prompt_length - 1 + t`` predicts response token ``t``, so its hidden state is the state in which the
    policy chose that token (what a value head scores).

    Shape: sequences (B, P+T), attention_mask (B, P+T) -> logits (B, T, V), hidden (B, T, H) or None.
    """
    response_length = sequences.shape[1] - prompt_length
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_length + 1,
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
    logits = out.logits[:, -response_length - 1 : -1]
    hidden = out.hidden_states[-1][:, prompt_length - 1 : -1] if output_hidden_states else None
    return logits, hidden


def full_precision_head(model: nn.Module) -> bool:
    """Run ``model``'s output embedding (the LM head) outside autocast, in its weights' dtype; returns whether it
    changed anything (False when already done or the model has no output embedding).

    Under ``bf16-mixed`` every matmul rounds its output to bfloat16: for logits of size ~20 that is an error of ~0.1
    nat per token, more than the per-token KL the penalty is meant to measure and enough to move PPO ratios across
    the clip range. The trunk keeps the speed of bfloat16 (its residual stream stays float32 under autocast); only the
    head, ~10 % of an RL forward's FLOPs for a 135M model, pays float32. Sampling goes through the same head, so the
    rollout samples from the distribution whose log-probs the update uses.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_lit_rlhf_full_precision", False):
        return False
    forward = head.forward

    def full_precision_forward(hidden: Tensor) -> Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return forward(hidden.to(head.weight.dtype))

    head.forward = full_precision_forward
    head._lit_rlhf_full_precision = True
    return True


def checkpoint_decoder_layers(model: nn.Module) -> int:
    """Wrap every transformer decoder layer of ``model`` in activation checkpointing; returns how many were wrapped.

    HF's own ``gradient_checkpointing_enable`` only acts in train mode, but the RL update runs in eval mode (dropout
    off, so the update's log-probs match the rollout's); torch's checkpoint wrapper works in either mode.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, GradientCheckpointingLayer))
    return len(layers)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each chosen token.

    Shape: logits (B, T, V), tokens (B, T) -> (B, T).
    """
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of each position's distribution; logits of -inf (masked tokens) contribute 0 and a finite gradient.

    Shape: (B, T, V) -> (B, T).
    """
    logp = logits.float().log_softmax(-1)
    # p·log p is 0·(-inf) = nan for masked tokens; zeroing log p first keeps both the value and the gradient finite.
    safe = logp.masked_fill(~torch.isfinite(logp), 0.0)
    return -(logp.exp() * safe).sum(-1)


def logprobs_and_entropy(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``logprobs_from_logits`` and ``entropy_from_logits`` from one log-softmax: over a 49k vocabulary the softmax
    is a large share of a training forward, so the policy's forward computes it once.

    Shape: logits (B, T, V), tokens (B, T) -> logprobs (B, T), entropy (B, T).
    """
    logp = logits.float().log_softmax(-1)
    safe = logp.masked_fill(~torch.isfinite(logp), 0.0)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * safe).sum(-1)


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
