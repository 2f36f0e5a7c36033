"""``RLHFModule``: the on-policy loop every RL algorithm shares (rollout → score → KL → update), around a plug-in
``PolicyOptimizer`` that decides advantages and the loss."""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import LogitsProcessorList

from lit_rlhf.models import (
    DType,
    LoraOptions,
    ScalarHead,
    export_pretrained,
    is_quantised,
    load_causal_lm,
    load_tokenizer,
    resolve,
)
from lit_rlhf.optim import SchedulerName, adamw, require_trainable
from lit_rlhf.rl.advantages import explained_variance, masked_mean
from lit_rlhf.rl.kl import FixedKL, KLController, KLEstimator, kl_estimate
from lit_rlhf.rl.losses import approx_kl
from lit_rlhf.rl.optimizers.base import Experience, PolicyOptimizer, PolicyOutputs
from lit_rlhf.rl.optimizers.ppo import PPO
from lit_rlhf.rl.rollout import (
    GenerationOptions,
    RunningMoments,
    causal_lm_forward,
    checkpoint_decoder_layers,
    cut_at_stop_strings,
    full_precision_head,
    kl_penalized_rewards,
    logprobs_and_entropy,
    logprobs_from_logits,
    stop_mask,
    stop_string_positions,
)
from lit_rlhf.rl.sampling import sample
from lit_rlhf.rl.vllm import VLLMOptions, VLLMRollout, require_vllm
from lit_rlhf.scale import (
    check_strategy,
    clip_grad_norm,
    fsdp_root,
    is_sharded,
    skip_gradient_sync,
    uses_grad_scaler,
)

RewardFn = Callable[[list[str], list[str]], Any]
"""A reward: ``(prompts, completions) -> Tensor | list[float]`` of shape (N,), one score per completion."""


def _numpy_rng_state() -> tuple:
    # As tensors and plain Python values, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


class Rollout(NamedTuple):
    """A sampled and scored batch: the experience plus the texts that crossed the reward boundary."""

    experience: Experience
    """Row-aligned tensors (see ``Experience``)."""
    prompts: list[str]
    """B prompt texts (each repeated ``num_samples`` times), as given to the reward."""
    completions: list[str]
    """B completion texts (special tokens dropped, cut before any stop string), as given to the reward."""
    raw_scores: Tensor
    """(B,) what the reward returned."""
    stopped: Tensor
    """(B,) bool: the response ended with EOS or a stop string (not by running out of ``max_new_tokens``)."""
    entropy: Tensor
    """(B, T) entropy of the sampling distribution at each response position."""
    seconds: dict[str, float]
    """Wall time of the rollout's parts: ``generate`` (sampling), ``score`` (the reward call), ``forward`` (the
    policy, reference and critic forwards)."""
    graph: PolicyOutputs | None = None
    """With ``keep_graph``: the policy's outputs with their autograd graph (the experience holds detached copies)."""


class RLHFModule(L.LightningModule):
    """RL fine-tuning of a causal LM against a reward, with a KL penalty to the frozen initial model.

    Each ``training_step`` is one iteration on a batch of prompts (manual optimisation): sample responses (KV
    cache, ``rollout_backend``), score the completion texts with ``reward``, compute per-token KL to the reference and
    rewards r_t = -β·kl_t (+ the score on the last token), let ``algorithm`` turn that into advantages, then run
    ``algorithm.epochs`` × ``algorithm.num_minibatches`` optimizer steps on ``algorithm.loss``. Note that
    ``trainer.global_step`` (and so ``trainer.max_steps``) counts optimizer steps, not iterations; bound iterations
    with ``trainer.max_epochs`` and ``trainer.limit_train_batches``. Forwards run with dropout off, so the first
    minibatch's ratio π/π_old is exactly 1. Don't set ``trainer.gradient_clip_val``: use ``max_grad_norm``.

    Args:
        policy: Causal LM to fine-tune: a bundled name (``smollm2-135m-instruct``, ``tiny-llama``), hub id or path.
            Its tokenizer is the data's tokenizer (the CLI links ``model.policy`` to ``data.tokenizer``).
        reward: Scores completions: any callable ``(prompts, completions) -> Tensor | list[float]`` of shape (N,).
            In YAML, a ``class_path`` (e.g. ``lit_rlhf.rewards.SentimentReward``, ``lit_rlhf.reward.RewardModel``)
            or the dotted import path of a function. Only text crosses this boundary. Required for training.
        algorithm: The RL algorithm (``lit_rlhf.rl.optimizers.PPO``, ``A2C``, ``NLPO`` or your own
            ``PolicyOptimizer``). None: ``PPO()``.
        kl: KL coefficient controller: ``lit_rlhf.rl.kl.FixedKL`` or ``AdaptiveKL``. None: ``FixedKL()``.
        kl_estimator: Per-token KL estimator in the reward penalty: ``k1`` = log π - log π_ref (unbiased, can be
            negative) or ``k3`` (unbiased, never negative); see joschu.net/blog/kl-approx.html.
        generation: How rollouts are sampled (lengths, temperature, stop strings, samples per prompt).
        lora: Train LoRA adapters instead of all weights. The reference is then the same model with the adapter
            disabled (no second copy); without LoRA it is a frozen deep copy of the initial policy.
        value_model: The critic: ``separate`` (its own trunk initialised from ``value_model_path`` or the policy, with
            a scalar head; gets LoRA too when ``lora`` is set), ``shared`` (a scalar head on the policy's last hidden
            state; the value loss then also trains the policy trunk) or ``none``. None: ``separate`` when the
            algorithm needs a critic, else ``none``.
        value_model_path: Checkpoint for the separate value trunk; None uses ``policy``.
        learning_rate: Learning rate of the policy's trainable weights.
        value_learning_rate: Learning rate of the critic; None uses ``learning_rate``.
        scheduler: Learning-rate schedule over iterations (both groups): ``constant``, or ``linear`` / ``cosine``
            decay to 0 at ``schedule_iterations``. Decay settles the policy at the end of a run instead of leaving it
            to drift with the last noisy updates.
        schedule_iterations: Iterations the schedule spans; None: the Trainer's estimate of training batches
            (``max_epochs`` × batches per epoch, or ``max_steps``).
        optimizer: Optimizer factory over parameter groups, e.g. ``torch.optim.AdamW`` or a bitsandbytes 8-bit
            optimizer; the groups' learning rates come from ``learning_rate`` / ``value_learning_rate``.
            None: AdamW without weight decay, fused into one kernel where the device has one (``optim.adamw``).
        max_grad_norm: Clip the global gradient norm before each optimizer step; None disables.
        gradient_accumulation_steps: Split each minibatch into this many micro-batches (backward each, step once) to
            save memory; the loss is the same up to the per-micro-batch token averaging.
        missing_eos_penalty: Subtract this from the score of responses that hit ``max_new_tokens`` without a stop.
        reward_clip: Clip scores to [-reward_clip, reward_clip] (after normalisation); None disables.
        normalize_reward: Standardise scores with the running mean and std of all scores seen so far.
        dtype: Weight dtype of the policy, reference and value models (the compute dtype of quantised ones).
        load_in_8bit: Load the policy's (and separate value trunk's) base weights in 8 bits (bitsandbytes LLM.int8)
            and train LoRA on top; needs ``lora``. The reference is then the same 8-bit base with the adapter off.
        load_in_4bit: As ``load_in_8bit`` with 4-bit NF4 weights (QLoRA, Dettmers et al. 2023).
        reference_load_in_8bit: Without LoRA, load the frozen reference separately in 8 bits instead of copying
            the policy (its log-probs then carry the quantisation error, so the KL starts slightly above 0).
        reference_load_in_4bit: As ``reference_load_in_8bit`` in 4-bit NF4.
        gradient_checkpointing: Recompute each decoder layer's activations in the backward pass of the update
            (policy and separate value trunk): less memory, about a third more compute. Under FSDP prefer the
            strategy's ``activation_checkpointing_policy``.
        rollout_backend: ``native`` samples with our decoding loop (``lit_rlhf.rl.sampling.sample``: the model's
            KV cache, transformers' logits processors, inverse-CDF draws; faster than ``generate`` on a CPU, same
            distribution, same greedy output); ``hf`` with HF ``generate``; ``vllm`` with a colocated vLLM engine
            (CUDA, ``pip install lit-rlhf[vllm]``) whose weights are refreshed after every update. Under FSDP with
            more than one process ``native`` hands over to ``generate``, whose ``synced_gpus`` keeps the ranks'
            decoding steps in step. Algorithms with a sampling logits processor (NLPO) need ``native`` or ``hf``.
        vllm: vLLM engine settings when ``rollout_backend`` is ``vllm``; None uses ``VLLMOptions()``.
        rollout_seed: Reseed torch from (rollout_seed, iteration, rank) at the start of every iteration, so that a
            resumed run repeats the uninterrupted one exactly whatever happened in between; None keeps the global
            RNG stream (whose state is still checkpointed). Named apart from the data module's shuffle ``seed``.
        attn_implementation: transformers' attention kernel for the policy, reference and value trunk (``eager``,
            ``sdpa``, ...); None keeps transformers' default (``sdpa``). On a CPU ``eager`` makes the update's
            backward faster at short lengths (bench/README.md: 0.710 s against 0.875 s for 8 × 73 tokens of
            SmolLM2); its memory grows with the square of the length.
    """

    reuse_rollout_forward: bool = True
    """Let the first update pass use the rollout's policy forward when they coincide (one minibatch, no gradient
    accumulation, no FSDP): one forward fewer per iteration, the same numbers. False recomputes it."""

    def __init__(
        self,
        policy: str,
        reward: RewardFn | None = None,
        algorithm: PolicyOptimizer | None = None,
        kl: KLController | None = None,
        kl_estimator: KLEstimator = "k1",
        generation: GenerationOptions = GenerationOptions(),
        lora: LoraOptions | None = None,
        value_model: Literal["separate", "shared", "none"] | None = None,
        value_model_path: str | None = None,
        learning_rate: float = 1e-5,
        value_learning_rate: float | None = None,
        scheduler: SchedulerName = "constant",
        schedule_iterations: int | None = None,
        optimizer: OptimizerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        gradient_accumulation_steps: int = 1,
        missing_eos_penalty: float | None = None,
        reward_clip: float | None = None,
        normalize_reward: bool = False,
        dtype: DType = "float32",
        rollout_seed: int | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        reference_load_in_8bit: bool = False,
        reference_load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        rollout_backend: Literal["native", "hf", "vllm"] = "native",
        vllm: VLLMOptions | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}.")
        if reward_clip is not None and reward_clip <= 0:
            raise ValueError(f"reward_clip must be > 0 (or null to disable), got {reward_clip}.")
        # Kept out of the module tree: the reward is frozen, manages its own device and is no part of checkpoints.
        object.__setattr__(self, "reward", reward)
        self.algorithm = algorithm if algorithm is not None else PPO()
        self.kl = kl if kl is not None else FixedKL()
        self.kl_estimator = kl_estimator
        self.generation = generation
        if generation.do_sample and (generation.top_k > 0 or generation.top_p < 1.0):
            rank_zero_warn(
                "generation.top_k / top_p truncate the sampling distribution but not the log-probs of the update, "
                "so the ratio and KL are slightly off-policy; leave them at 0 / 1.0 unless you mean it."
            )
        self.learning_rate, self.value_learning_rate = learning_rate, value_learning_rate
        if schedule_iterations is not None and schedule_iterations < 1:
            raise ValueError(f"schedule_iterations must be >= 1 (or null), got {schedule_iterations}.")
        self.scheduler, self.schedule_iterations = scheduler, schedule_iterations
        self._optimizer_factory = optimizer
        self.max_grad_norm, self.gradient_accumulation_steps = max_grad_norm, gradient_accumulation_steps
        self.missing_eos_penalty = missing_eos_penalty
        self.reward_clip = reward_clip
        self.normalize_reward = normalize_reward
        self.rollout_seed = rollout_seed
        self.iteration = 0
        self.reward_moments = RunningMoments()

        quantised = {"load_in_8bit": load_in_8bit, "load_in_4bit": load_in_4bit}
        if any(quantised.values()) and lora is None:
            raise ValueError("load_in_8bit / load_in_4bit freeze the base weights: set model.lora to train adapters.")
        if (reference_load_in_8bit or reference_load_in_4bit) and lora is not None:
            raise ValueError(
                "With LoRA the reference is the policy with its adapter off (no second model): quantise the base "
                "with load_in_8bit / load_in_4bit instead of reference_load_in_*."
            )
        if rollout_backend == "vllm":
            require_vllm()
        elif vllm is not None:
            raise ValueError("model.vllm is only used with rollout_backend: vllm.")
        self.rollout_backend = rollout_backend
        self.vllm_options = vllm or VLLMOptions()
        self._vllm: VLLMRollout | None = None
        self.lora = lora

        self.tokenizer = load_tokenizer(policy, padding_side="left")
        self.policy = load_causal_lm(
            policy, dtype=dtype, lora=lora, attn_implementation=attn_implementation, **quantised
        )
        if lora is not None:
            self.reference = None
        elif reference_load_in_8bit or reference_load_in_4bit:
            self.reference = load_causal_lm(
                policy,
                dtype=dtype,
                load_in_8bit=reference_load_in_8bit,
                load_in_4bit=reference_load_in_4bit,
                attn_implementation=attn_implementation,
            ).eval()
            self.reference.requires_grad_(False)
        else:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        config_eos = self.policy.generation_config.eos_token_id
        config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
        self.stop_token_ids = sorted({self.tokenizer.eos_token_id, *config_eos} - {None})

        self.value_mode = value_model or ("separate" if self.algorithm.needs_critic else "none")
        name = type(self.algorithm).__name__
        if self.algorithm.needs_critic and self.value_mode == "none":
            raise ValueError(f"{name} needs a critic: set model.value_model to 'separate' or 'shared' (or leave null).")
        if not self.algorithm.needs_critic and self.value_mode != "none":
            raise ValueError(f"{name} uses no critic: set model.value_model to 'none' (or leave null).")
        if value_model_path is not None and self.value_mode != "separate":
            raise ValueError("model.value_model_path is only used with value_model: separate.")
        self.value_model = (
            ScalarHead.from_pretrained(
                value_model_path or policy, dtype=dtype, lora=lora, attn_implementation=attn_implementation, **quantised
            )
            if self.value_mode == "separate"
            else None
        )
        if gradient_checkpointing:
            checkpoint_decoder_layers(self.policy)
            if self.value_model is not None:
                checkpoint_decoder_layers(self.value_model)
        self.value_head = None
        if self.value_mode == "shared":
            self.value_head = nn.Linear(self.policy.config.hidden_size, 1, dtype=self.policy.dtype)
        # A critic that knows nothing predicts 0, the mean of normalised returns. A random head would not: last hidden
        # states have norms of ~40 (SmolLM2), so a 1/sqrt(d) init gives per-token values with a std of ~1.7, more
        # than the returns', which GAE turns into advantage noise larger than the signal for the first iterations.
        critic_head = self.value_head if self.value_head is not None else getattr(self.value_model, "head", None)
        if critic_head is not None:
            nn.init.zeros_(critic_head.weight)
            nn.init.zeros_(critic_head.bias)
        self.algorithm.bind(self)

    def setup(self, stage: str) -> None:
        check_strategy(self, quantised=is_quantised(self.policy))
        if str(self.trainer.precision).endswith("-mixed"):
            # Autocast trunk, full-precision logits: log-probs, KL and ratios keep their meaning (see the helper).
            for model in (self.policy, self.reference):
                if model is not None:
                    full_precision_head(model)
        if self.rollout_backend == "vllm" and is_sharded(self):
            raise ValueError("rollout_backend: vllm needs whole weights on every rank: use strategy: ddp, not FSDP.")

    # --- sampling and scoring --------------------------------------------------------------------------------------

    def _sample(
        self, prompt_ids: Tensor, prompt_mask: Tensor, options: GenerationOptions, processor: Any | None = None
    ) -> Tensor:
        """Shape: (B, P), (B, P) -> (B, P+T) sequences, T <= max_new_tokens."""
        if self.rollout_backend == "vllm":
            if processor is not None:
                raise ValueError(
                    f"{type(self.algorithm).__name__} samples through a logits processor, which vLLM cannot run: "
                    "use rollout_backend: native or hf."
                )
            return self._vllm_engine().sample(
                prompt_ids, prompt_mask, options, self.stop_token_ids, self.tokenizer.pad_token_id
            )
        if self.rollout_backend == "native" and not is_sharded(self):
            return sample(
                self.policy,
                prompt_ids,
                prompt_mask,
                options,
                self.stop_token_ids,
                self.tokenizer.pad_token_id,
                processor,
                self.tokenizer,
            )
        config = options.to_hf(self.stop_token_ids, self.tokenizer.pad_token_id)
        return self.policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([processor]) if processor is not None else None,
            tokenizer=self.tokenizer if options.stop_strings else None,
            # Under FSDP every decoding step all-gathers each layer's shards: all ranks must run the same number of
            # steps, so those that finish early keep stepping until the last one is done.
            synced_gpus=is_sharded(self),
        )

    def _vllm_engine(self) -> VLLMRollout:
        if self._vllm is None:
            world_size = self.trainer.world_size if self._trainer is not None else 1
            self._vllm = VLLMRollout(resolve(self.hparams.policy), self.vllm_options, self.lora, world_size)
            if self.iteration > 0 or self.lora is not None:  # resumed, or LoRA: vLLM must see the current adapter
                self._vllm.push(self.policy)
        return self._vllm

    def _finish(self, response_ids: Tensor, options: GenerationOptions) -> tuple[Tensor, Tensor, list[str]]:
        """Stop mask, stopped flags and completion texts. Shape: (B, T) -> (B, T) float, (B,) bool, B strings."""
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

    def score(self, prompts: list[str], completions: list[str]) -> Tensor:
        """Call the reward and check its output. Returns (N,) float32 on this module's device."""
        if self.reward is None:
            raise RuntimeError("RLHFModule has no reward: set model.reward (a class_path or a function's import path).")
        out = self.reward(prompts, completions)
        scores = (
            out.detach().float().flatten() if isinstance(out, Tensor) else torch.as_tensor(out, dtype=torch.float32)
        )
        if scores.shape != (len(completions),):
            raise ValueError(
                f"reward {self.reward!r} returned shape {tuple(scores.shape)} for {len(completions)} completions; "
                "it must return one score per completion (a 1-D tensor or list)."
            )
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward {self.reward!r} returned non-finite scores: {scores.tolist()}.")
        return scores.to(self.device)

    def _shape_scores(self, raw: Tensor, stopped: Tensor) -> Tensor:
        scores = raw.clone()
        if self.missing_eos_penalty:
            scores = scores - self.missing_eos_penalty * (~stopped).float()
        if self.normalize_reward:
            self.reward_moments.update(self._gather(scores).flatten())
            scores = (scores - self.reward_moments.mean) / (self.reward_moments.std + 1e-8)
        if self.reward_clip is not None:
            scores = scores.clamp(-self.reward_clip, self.reward_clip)
        return scores

    def policy_outputs(
        self, sequences: Tensor, attention_mask: Tensor, prompt_length: int, hooks: bool = True
    ) -> PolicyOutputs:
        """The policy's log-probs, entropy and values on the response; ``hooks=False`` skips the algorithm's logits
        transform and the critic. Shape: (B, P+T) -> PolicyOutputs of (B, T)."""
        transform = self.algorithm.logits_transform(self, sequences, attention_mask, prompt_length) if hooks else None
        shared_value = hooks and self.value_head is not None
        logits, hidden = causal_lm_forward(
            self.policy, sequences, attention_mask, prompt_length, output_hidden_states=shared_value
        )
        logits = self._temperature_scaled(logits)
        if transform is not None:
            logits = transform(logits)
        values = None
        if shared_value:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        elif hooks and self.value_model is not None:
            values = self.value_model(sequences, attention_mask)[:, prompt_length - 1 : -1].float()
        response = sequences[:, prompt_length:]
        logprobs, entropy = logprobs_and_entropy(logits, response)
        return PolicyOutputs(logprobs, entropy, values)

    def _temperature_scaled(self, logits: Tensor) -> Tensor:
        temperature = self.generation.temperature if self.generation.do_sample else 1.0
        return logits / temperature if temperature != 1.0 else logits

    def reference_logprobs(self, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
        """Log-probs of the response under the frozen reference. Shape: (B, P+T) -> (B, T)."""
        if self.reference is not None:
            logits, _ = causal_lm_forward(self.reference, sequences, attention_mask, prompt_length)
        else:
            with self.policy.disable_adapter():
                logits, _ = causal_lm_forward(self.policy, sequences, attention_mask, prompt_length)
        return logprobs_from_logits(self._temperature_scaled(logits), sequences[:, prompt_length:])

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], hooks: bool = True, keep_graph: bool = False) -> Rollout:
        """Sample, score and evaluate one batch of prompts (``PromptDataModule`` batches).

        ``hooks=False`` samples from the plain policy, without the algorithm's logits processor / transform or the
        critic (evaluation). ``keep_graph=True`` runs the policy's forward with autograd on and returns it as
        ``Rollout.graph``, for an update whose first pass sees the same weights (see ``training_step``).
        """
        prompts, prompt_ids, prompt_mask = list(batch["prompt"]), batch["input_ids"], batch["attention_mask"]
        k = self.generation.num_samples
        group = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(k)
        if k > 1:
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
            prompts = [p for p in prompts for _ in range(k)]
        clock = time.perf_counter()
        processor = self.algorithm.logits_processor(self, prompt_ids, prompt_mask) if hooks else None
        sequences = self._sample(prompt_ids, prompt_mask, self.generation, processor)
        length = prompt_ids.shape[1]
        response_ids = sequences[:, length:]
        response_mask, stopped, completions = self._finish(response_ids, self.generation)
        seconds = {"generate": time.perf_counter() - clock}
        clock = time.perf_counter()
        raw = self.score(prompts, completions)
        seconds["score"] = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = self._shape_scores(raw, stopped) if hooks else raw
        attention_mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
        with torch.enable_grad() if keep_graph else nullcontext():
            graph = self.policy_outputs(sequences, attention_mask, length, hooks=hooks)
        outputs = graph.detach()
        ref_logprobs = self.reference_logprobs(sequences, attention_mask, length)
        kl = kl_estimate(outputs.logprobs, ref_logprobs, self.kl_estimator) * response_mask
        experience = Experience(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=outputs.logprobs,
            ref_logprobs=ref_logprobs,
            values=outputs.values if hooks else None,
            scores=scores,
            kl=kl,
            rewards=kl_penalized_rewards(scores, kl, response_mask, self.kl.coef),
            group=group,
        )
        seconds["forward"] = time.perf_counter() - clock
        return Rollout(
            experience, prompts, completions, raw, stopped, outputs.entropy, seconds, graph if keep_graph else None
        )

    # --- the iteration ---------------------------------------------------------------------------------------------

    def _gather(self, values: Tensor) -> Tensor:
        """``values`` from every process, flattened (just ``values`` outside a Trainer)."""
        return self.all_gather(values).flatten() if self._trainer is not None else values.flatten()

    def _reseed(self) -> None:
        torch.manual_seed(((self.rollout_seed * 1_000_003 + self.iteration) * 10_007 + self.global_rank) % 2**63)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.rollout_seed is not None:
            self._reseed()
        self.eval()  # no dropout: rollout and update forwards must agree
        self.algorithm.on_iteration_start(self, self.iteration)
        start = time.perf_counter()
        rollout = self.rollout(batch, keep_graph=self.update_reuses_rollout_forward())
        rollout_time = time.perf_counter() - start
        with torch.no_grad():
            advantages, returns = self.algorithm.advantages(rollout.experience)
        experience = dataclasses.replace(rollout.experience, advantages=advantages, returns=returns)
        start = time.perf_counter()
        if self._vllm is not None:
            self._vllm.sleep()
        update_metrics = self._update(experience, rollout.graph)
        if self._vllm is not None:
            self._vllm.wake_up()
            self._vllm.push(self.policy)
        update_time = time.perf_counter() - start

        mask = experience.response_mask
        sequence_kl = experience.kl.sum(-1)
        kl_coef = self.kl.coef
        global_kl = self._gather(sequence_kl)
        self.kl.update(global_kl.mean().item(), n_steps=global_kl.numel())
        metrics = {
            "objective/score": rollout.raw_scores.mean(),
            "objective/score_std": rollout.raw_scores.std(unbiased=False),
            "objective/reward": experience.rewards.sum(-1).mean(),
            "objective/kl": sequence_kl.mean(),
            "objective/kl_coef": torch.tensor(kl_coef),
            "objective/entropy": masked_mean(rollout.entropy, mask),
            "response/length": mask.sum(-1).mean(),
            "response/eos_frac": rollout.stopped.float().mean(),
            "time/rollout": torch.tensor(rollout_time),
            "time/update": torch.tensor(update_time),
            **{f"time/{part}": torch.tensor(value) for part, value in rollout.seconds.items()},
            "iteration": torch.tensor(float(self.iteration)),
            "policy/lr": torch.tensor(float(self.optimizers().param_groups[0]["lr"])),
            **update_metrics,
        }
        if experience.values is not None and experience.returns is not None:
            metrics["value/explained_variance"] = explained_variance(experience.values, experience.returns, mask)
            metrics["value/mean"] = masked_mean(experience.values, mask)
        metrics = self._reduce_metrics(metrics)
        all_scores = self._gather(rollout.raw_scores)
        metrics["objective/score"] = all_scores.mean().cpu()
        metrics["objective/score_std"] = all_scores.std(unbiased=False).cpu()
        shown = ("objective/score", "objective/kl")
        for prog_bar, group in ((True, shown), (False, [k for k in metrics if k not in shown])):
            self.log_dict(
                {k: metrics[k] for k in group},
                prog_bar=prog_bar,
                on_step=True,
                on_epoch=False,
                batch_size=experience.batch_size,
            )
        if self.scheduler != "constant":
            self.lr_schedulers().step()
        self.iteration += 1
        return {
            "prompts": rollout.prompts,
            "completions": rollout.completions,
            "scores": rollout.raw_scores.cpu(),
            "metrics": {key: value.item() for key, value in metrics.items()},
        }

    def _reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, Tensor]:
        """Each metric's mean over all processes (one all-reduce for all of them), as CPU float tensors.

        Equivalent to ``self.log(..., sync_dist=True)`` per key, which would cost one collective per metric.
        """
        keys = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k]).detach().float().to(self.device).reshape(()) for k in keys])
        if self._trainer is not None and self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        return dict(zip(keys, values.cpu(), strict=True))

    def _mean_over_ranks(self, value: float) -> float:
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return float(self.trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="mean"))

    def update_reuses_rollout_forward(self) -> bool:
        """Whether this iteration's update starts from the rollout's policy forward (see ``reuse_rollout_forward``).

        With one minibatch and no accumulation the first update pass runs at the rollout's weights on all its rows,
        so its forward is the rollout's. Not under FSDP, whose units reshard between forward and backward on a
        schedule of their own.
        """
        return (
            self.reuse_rollout_forward
            and self.algorithm.num_minibatches == 1
            and self.gradient_accumulation_steps == 1
            and fsdp_root(self) is None
        )

    def _update(self, experience: Experience, first: PolicyOutputs | None = None) -> dict[str, Tensor]:
        """``epochs`` × ``num_minibatches`` optimizer steps on ``algorithm.loss``; returns the mean metrics.

        ``first``: the policy's outputs on all of ``experience``'s rows at the current weights, with their graph; the
        first micro-batch uses them (its rows selected) instead of a forward of its own.
        """
        algorithm, opt = self.algorithm, self.optimizers()
        rows = experience.batch_size
        if algorithm.num_minibatches * self.gradient_accumulation_steps > rows:
            raise ValueError(
                f"{type(algorithm).__name__}.num_minibatches ({algorithm.num_minibatches}) × "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) exceeds the {rows} rollout rows; "
                "lower them or raise "
                "data.batch_size / generation.num_samples."
            )
        totals: dict[str, float] = defaultdict(float)
        steps, early_stop = 0, False
        for _ in range(algorithm.epochs):
            order = torch.randperm(rows, device=self.device)
            for minibatch in order.chunk(algorithm.num_minibatches):
                step_metrics: dict[str, float] = defaultdict(float)
                micros = minibatch.chunk(self.gradient_accumulation_steps)
                for i, micro in enumerate(micros):
                    part = experience.select(micro)
                    # Under DDP every manual_backward all-reduces: accumulate locally until the last micro-batch.
                    last = i == len(micros) - 1
                    with nullcontext() if last or self._trainer is None else skip_gradient_sync(self):
                        if first is not None:
                            outputs, first = first.select(micro), None
                        else:
                            outputs = self.policy_outputs(part.sequences, part.attention_mask, part.prompt_ids.shape[1])
                        loss, metrics = algorithm.loss(part, outputs)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"{type(algorithm).__name__}.loss is {loss.item()} at iteration {self.iteration}; "
                                "lower the learning rate, clip rewards (reward_clip) or check the reward's scale."
                            )
                        weight = len(micro) / len(minibatch)
                        self.manual_backward(loss * weight)
                    metrics["policy/approx_kl"] = approx_kl(
                        outputs.logprobs.detach(), part.logprobs, part.response_mask
                    )
                    for key, value in metrics.items():
                        step_metrics[key] += weight * float(value)
                if self.max_grad_norm is not None:
                    clip_grad_norm(self, opt, self.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                for key, value in step_metrics.items():
                    totals[key] += value
                # Every rank must take the same number of steps (each backward is a collective): decide on the mean.
                if algorithm.target_kl is not None and self._mean_over_ranks(step_metrics["policy/approx_kl"]) > (
                    algorithm.target_kl
                ):
                    early_stop = True
                    break
            if early_stop:
                break
        metrics = {key: torch.tensor(value / steps) for key, value in totals.items()}
        metrics["policy/optimizer_steps"] = torch.tensor(float(steps))
        metrics["policy/early_stop"] = torch.tensor(float(early_stop))
        return metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sample from the plain policy (no algorithm hooks) and log the raw score and KL to the reference."""
        rollout = self.rollout(batch, hooks=False)
        mask = rollout.experience.response_mask
        metrics = {
            "val/score": rollout.raw_scores.mean(),
            "val/kl": rollout.experience.kl.sum(-1).mean(),
            "val/length": mask.sum(-1).mean(),
            "val/eos_frac": rollout.stopped.float().mean(),
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=mask.shape[0])

    def configure_optimizers(self) -> Any:
        policy_params = require_trainable(self, [p for p in self.policy.parameters() if p.requires_grad])
        groups = [{"params": policy_params, "lr": self.learning_rate}]
        critic = self.value_head if self.value_head is not None else self.value_model
        if critic is not None:
            lr = self.value_learning_rate if self.value_learning_rate is not None else self.learning_rate
            groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": lr})
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(groups)
        else:
            optimizer = adamw(groups, self.learning_rate, weight_decay=0.0, fused=not uses_grad_scaler(self))
        if self.scheduler == "constant":
            return optimizer
        from transformers import get_scheduler

        total = self.schedule_iterations or max(1, int(self.trainer.estimated_stepping_batches))
        schedule = get_scheduler(self.scheduler, optimizer, num_warmup_steps=0, num_training_steps=total)
        # Stepped once per iteration in training_step (manual optimisation: Lightning does not step it).
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlhf"] = {
            "iteration": self.iteration,
            "kl": self.kl.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": _numpy_rng_state(),
                "python": random.getstate(),
            },
        }
        # The reference is the initial policy, rebuilt from `policy` on load: no need to store a second model.
        for key in [k for k in checkpoint["state_dict"] if k.startswith("reference.")]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            for key, value in self.reference.state_dict().items():
                checkpoint["state_dict"].setdefault(f"reference.{key}", value)
        state = checkpoint.get("rlhf")
        if state is None:
            return
        self.iteration = int(state["iteration"])
        self.kl.load_state_dict(state["kl"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(rng["python"])

    # --- using the policy ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        generation: GenerationOptions | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        max_prompt_length: int = 256,
        batch_size: int = 16,
    ) -> list[str]:
        """Completions of the current policy (no algorithm hooks) for raw prompt texts, encoded as
        ``PromptDataModule`` does; ``num_samples`` completions per prompt, adjacent."""
        from lit_rlhf.data.encoding import encode_prompt, pad_left

        options = generation or self.generation
        was_training = self.training
        self.eval()
        completions: list[str] = []
        for start in range(0, len(prompts), batch_size):
            ids = [
                encode_prompt(self.tokenizer, p, max_prompt_length, chat_template, system_prompt)
                for p in prompts[start : start + batch_size]
            ]
            prompt_ids, prompt_mask = pad_left(ids, self.tokenizer.pad_token_id)
            prompt_ids = prompt_ids.repeat_interleave(options.num_samples, 0).to(self.device)
            prompt_mask = prompt_mask.repeat_interleave(options.num_samples, 0).to(self.device)
            sequences = self._sample(prompt_ids, prompt_mask, options)
            completions += self._finish(sequences[:, prompt_ids.shape[1] :], options)[2]
        self.train(was_training)
        return completions

    def export_model(self) -> tuple[nn.Module, Any]:
        """The policy and its tokenizer (used by ``lit_rlhf.callbacks.HFExportCallback``)."""
        return self.policy, self.tokenizer

    def export(self, path: str | Path) -> Path:
        """Save the policy as a plain ``transformers`` checkpoint (LoRA merged into a copy) with its tokenizer."""
        return export_pretrained(self.policy, self.tokenizer, path)
