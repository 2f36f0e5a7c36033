"""The models of RL fine-tuning: building the policy, its frozen reference and the critic (``PolicyModels``), the
forwards that turn sampled responses into log-probs, entropy and values, and the critic's export."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_rlhf.finetuning import Exportable, plain_copy, token_classifier
from lit_rlhf.freezing import check_trainable_layers, layer_stack
from lit_rlhf.models import DType, LoraOptions, ScalarHead, load_causal_lm, require_lora_for_quantisation
from lit_rlhf.rl.experience import PolicyOutputs

ValueModel = Literal["separate", "shared", "none"]
"""How the critic is built: its own trunk with a scalar head, a scalar head on the policy's last hidden state, or
no critic at all."""

LogitsTransform = Callable[[Tensor], Tensor]
"""Maps response logits (b, T, V) to the logits that log-probs, ratio and entropy use."""


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


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each chosen token.

    Shape: logits (B, T, V), tokens (B, T) -> (B, T).
    """
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _EntropyFromLogp(torch.autograd.Function):
    """H = −Σ_v p_v·log p_v from log-probabilities, whose backward keeps nothing but ``logp`` (which log_softmax keeps
    for its own backward anyway): written with plain autograd it would also hold exp(logp) and a masked copy, two more
    (B, T, V) float32 tensors (126 MB each for 8 × 80 tokens of a 49k vocabulary) alive until the backward.

    p·log p is 0·(−inf) = nan for masked tokens (log p = −inf): they count 0, and so does their gradient.
    """

    @staticmethod
    def forward(ctx: Any, logp: Tensor) -> Tensor:
        ctx.save_for_backward(logp)
        return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (logp,) = ctx.saved_tensors
        # ∂H/∂(log p_v) = −p_v·(log p_v + 1), 0 where p_v = 0
        return -grad.unsqueeze(-1) * logp.exp() * (logp.masked_fill(~torch.isfinite(logp), 0.0) + 1)


def _entropy(logp: Tensor) -> Tensor:
    return _EntropyFromLogp.apply(logp)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of each position's distribution; logits of -inf (masked tokens) contribute 0 and a finite gradient.

    Shape: (B, T, V) -> (B, T).
    """
    return _entropy(logits.float().log_softmax(-1))


def logprobs_and_entropy(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``logprobs_from_logits`` and ``entropy_from_logits`` from one log-softmax: over a 49k vocabulary the softmax
    is a large share of a training forward, so the policy's forward computes it once.

    Shape: logits (B, T, V), tokens (B, T) -> logprobs (B, T), entropy (B, T).
    """
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), _entropy(logp)


def restrict(
    logits: Tensor, temperature: float = 1.0, banned: Tensor | None = None, tokens: Tensor | None = None
) -> Tensor:
    """The logits of the distribution responses are sampled from: divided by ``temperature``, with the ``banned``
    token ids at -inf, except where ``tokens`` holds one: the padding after a response's stop may be a banned id, and
    its log-prob must stay finite (it is masked out, but -inf · 0 would be nan).

    Shape: logits (B, T, V), banned (K,) long, tokens (B, T) -> (B, T, V).
    """
    if temperature != 1.0:
        logits = logits / temperature
    if banned is not None and banned.numel():
        masked = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
        if tokens is not None:
            index = tokens.unsqueeze(-1)
            masked = masked.scatter(-1, index, logits.gather(-1, index))
        logits = masked
    return logits


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


def check_policy_options(
    critic: ValueModel,
    lora: LoraOptions | None,
    value_model_path: str | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    reference_load_in_8bit: bool = False,
    reference_load_in_4bit: bool = False,
    prefix: str = "model.",
    trainable_layers: int | None = None,
) -> None:
    """Fail on option combinations ``PolicyModels.load`` cannot build, before any weights are read; errors name the
    options ``{prefix}{option}``."""
    require_lora_for_quantisation(lora, load_in_8bit, load_in_4bit, prefix)
    check_trainable_layers(trainable_layers, prefix=prefix)
    if (reference_load_in_8bit or reference_load_in_4bit) and lora is not None:
        raise ValueError(
            "With LoRA the reference is the policy with its adapter off (no second model): quantise the base "
            f"with {prefix}load_in_8bit / load_in_4bit instead of {prefix}reference_load_in_*."
        )
    if value_model_path is not None and critic != "separate":
        raise ValueError(f"{prefix}value_model_path is only used with {prefix}value_model: separate.")


class PolicyModels(nn.Module):
    """The policy LM, its frozen reference and an optional critic, with the forwards RL takes through them.

    The reference is the frozen initial policy: with LoRA, the policy itself with the adapter disabled (``reference``
    is then None); without, a frozen copy or a separately loaded quantised model. The critic is ``value_model`` (its
    own trunk and scalar head) or ``value_head`` (a linear head on the policy's last hidden state), or neither.

    Args:
        policy: The causal LM being trained (a peft model with LoRA).
        reference: The frozen reference model; None with LoRA (adapter off) or when no reference is needed.
        value_model: A separate critic.
        value_head: A critic head on the policy's last hidden state.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None = None,
        value_model: nn.Module | None = None,
        value_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.policy, self.reference = policy, reference
        self.value_model, self.value_head = value_model, value_head

    @classmethod
    def load(
        cls,
        name: str,
        critic: ValueModel = "none",
        dtype: DType = "float32",
        lora: LoraOptions | None = None,
        value_model_path: str | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        reference_load_in_8bit: bool = False,
        reference_load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        trainable_layers: int | None = None,
        reference_dtype: DType | None = None,
        reference: bool = True,
    ) -> PolicyModels:
        """Load the policy from ``name`` (bundled name, hub id or path) and build the reference and the critic.

        Arguments as ``RLHFModule``'s of the same names; ``critic`` is the resolved ``value_model`` and
        ``reference=False`` skips the frozen copy (for sampling alone).
        """
        check_policy_options(
            critic, lora, value_model_path, load_in_8bit, load_in_4bit, reference_load_in_8bit, reference_load_in_4bit
        )
        # A separate value trunk loads as the policy does: the same quantisation, the same top layers trained.
        like_policy = {"load_in_8bit": load_in_8bit, "load_in_4bit": load_in_4bit, "trainable_layers": trainable_layers}
        policy = load_causal_lm(name, dtype=dtype, lora=lora, attn_implementation=attn_implementation, **like_policy)
        frozen = None
        if lora is None and (reference_load_in_8bit or reference_load_in_4bit):
            frozen = load_causal_lm(
                name,
                dtype=dtype,
                load_in_8bit=reference_load_in_8bit,
                load_in_4bit=reference_load_in_4bit,
                attn_implementation=attn_implementation,
            )
        elif lora is None and reference:
            frozen = copy.deepcopy(policy)
            if reference_dtype is not None:
                # Only the layers: embeddings and the LM head keep the policy's dtype, so the log-probs keep theirs.
                layer_stack(frozen)[1].to(getattr(torch, reference_dtype))
        if frozen is not None:
            frozen.requires_grad_(False).eval()
        value_model = None
        if critic == "separate":
            value_model = ScalarHead.from_pretrained(
                value_model_path or name, dtype=dtype, lora=lora, attn_implementation=attn_implementation, **like_policy
            )
        if gradient_checkpointing:
            checkpoint_decoder_layers(policy)
            if value_model is not None:
                checkpoint_decoder_layers(value_model)
        value_head = nn.Linear(policy.config.hidden_size, 1, dtype=policy.dtype) if critic == "shared" else None
        # A critic that knows nothing predicts 0, the mean of normalised returns. A random head would not: last hidden
        # states have norms of ~40 (SmolLM2), so a 1/sqrt(d) init gives per-token values with a std of ~1.7, more
        # than the returns', which GAE turns into advantage noise larger than the signal for the first iterations.
        head = value_head if value_head is not None else getattr(value_model, "head", None)
        if head is not None:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return cls(policy, frozen, value_model, value_head)

    @classmethod
    def options(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``arguments`` (e.g. ``RLHFModule``'s) that are keyword arguments of ``load``."""
        names = set(inspect.signature(cls.load).parameters) - {"name", "critic"}
        return {key: value for key, value in arguments.items() if key in names}

    @property
    def critic(self) -> nn.Module | None:
        """The module whose parameters the value loss trains (head or separate model), or None."""
        return self.value_head if self.value_head is not None else self.value_model

    def critic_classifier(self) -> nn.Module | None:
        """The critic as a plain transformers token classifier with one label (``finetuning.token_classifier``;
        LoRA merged into a copy), or None without a critic. Its logit at position i is the critic's value of the
        state after token i, the value ``outputs`` gives the response token at i + 1. A shared critic's trunk is the
        policy's: the classifier is then the policy's transformer under the value head, without the LM head."""
        if self.value_head is not None:
            return token_classifier(plain_copy(self.policy).base_model, self.value_head)
        if self.value_model is not None:
            return token_classifier(self.value_model.trunk, self.value_model.head)
        return None

    def parameter_groups(self, learning_rate: float, value_learning_rate: float | None = None) -> list[dict]:
        """The optimizer's parameter groups: the policy's trainable weights at ``learning_rate``, then the critic's
        at ``value_learning_rate`` (None: ``learning_rate``)."""
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": learning_rate}]
        if self.critic is not None:
            lr = value_learning_rate if value_learning_rate is not None else learning_rate
            groups.append({"params": [p for p in self.critic.parameters() if p.requires_grad], "lr": lr})
        return groups

    def drop_reference(self, state_dict: dict[str, Tensor], prefix: str = "") -> None:
        """Remove the reference's weights from a state dict being saved: the reference is the initial policy, which
        ``restore_reference`` rebuilds on load, so checkpoints need not store a second model."""
        for key in [k for k in state_dict if k.startswith(f"{prefix}reference.")]:
            del state_dict[key]

    def restore_reference(self, state_dict: dict[str, Tensor], prefix: str = "") -> None:
        """Put this reference's (initial) weights back into a state dict saved by ``drop_reference``."""
        if self.reference is not None:
            for key, value in self.reference.state_dict().items():
                state_dict.setdefault(f"{prefix}reference.{key}", value)

    def full_precision_heads(self) -> None:
        """Keep the LM heads of the policy and the reference in float32 under autocast (see ``full_precision_head``)."""
        for model in (self.policy, self.reference):
            if model is not None:
                full_precision_head(model)

    def outputs(
        self,
        sequences: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        temperature: float = 1.0,
        transform: LogitsTransform | None = None,
        critic: bool = True,
        banned: Tensor | None = None,
    ) -> PolicyOutputs:
        """The policy's log-probs and entropy on the response, at logits divided by ``temperature``, with the
        ``banned`` token ids (never sampled) masked out, then passed through ``transform``; with ``critic``, the
        critic's values too.

        Shape: sequences (B, P+T), attention_mask (B, P+T) -> PolicyOutputs of (B, T).
        """
        shared_value = critic and self.value_head is not None
        logits, hidden = causal_lm_forward(
            self.policy, sequences, attention_mask, prompt_length, output_hidden_states=shared_value
        )
        response = sequences[:, prompt_length:]
        logits = restrict(logits, temperature, banned, response)
        if transform is not None:
            logits = transform(logits)
        values = None
        if shared_value:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        elif critic and self.value_model is not None:
            values = self.value_model(sequences, attention_mask)[:, prompt_length - 1 : -1].float()
        logprobs, entropy = logprobs_and_entropy(logits, response)
        return PolicyOutputs(logprobs, entropy, values)

    def reference_logprobs(
        self,
        sequences: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        temperature: float = 1.0,
        banned: Tensor | None = None,
    ) -> Tensor:
        """Log-probs of the response under the frozen reference, at the same temperature and on the same tokens as
        the policy (``banned`` masked out), so that the KL between the two is 0 at the start. Shape: (B, P+T) ->
        (B, T)."""
        if self.reference is not None:
            logits, _ = causal_lm_forward(self.reference, sequences, attention_mask, prompt_length)
        elif hasattr(self.policy, "disable_adapter"):
            with self.policy.disable_adapter():
                logits, _ = causal_lm_forward(self.policy, sequences, attention_mask, prompt_length)
        else:
            raise RuntimeError("These PolicyModels were loaded without a reference (reference=False).")
        response = sequences[:, prompt_length:]
        return logprobs_from_logits(restrict(logits, temperature, banned, response), response)


class CriticExportable(Exportable):
    """``Exportable`` for a module whose ``models`` are ``PolicyModels``: its critic, when it has one, exports
    beside the model in ``critic/`` (``PolicyModels.critic_classifier``)."""

    models: PolicyModels

    def export_critic(self) -> nn.Module | None:
        return self.models.critic_classifier()
