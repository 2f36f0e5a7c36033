"""``RLHFModule``: the Lightning loop every on-policy RL algorithm shares (iteration, update, validation, metric
reduction, checkpoint state) around a plug-in ``PolicyOptimizer`` that decides advantages and the loss."""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_rlhf.finetuning import (
    SchedulerName,
    adamw,
    check_finite,
    lr_schedule,
    require_trainable,
)
from lit_rlhf.hparams import make_plain
from lit_rlhf.models import DType, LoraOptions, is_quantised, load_tokenizer, resolve
from lit_rlhf.rl.checks import check_arguments, upgrade_checkpoint
from lit_rlhf.rl.decoding import GenerationOptions, Sampler
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.generation import PolicyGenerator, make_sampler
from lit_rlhf.rl.kl import FixedKL, KLController, KLEstimator, kl_estimate
from lit_rlhf.rl.optimizers import PPO, PolicyOptimizer
from lit_rlhf.rl.policy import CriticExportable, PolicyModels
from lit_rlhf.rl.scoring import RewardFn, RewardShaping, to_experience
from lit_rlhf.rl.stats import DegenerationWarnings, iteration_metrics
from lit_rlhf.rl.update import FINITE_ADVICE, run_update
from lit_rlhf.rl.vllm import VLLMOptions
from lit_rlhf.rng import rng_state, seed_iteration, set_rng_state
from lit_rlhf.scale import (
    check_strategy,
    fsdp_root,
    gather_flat,
    is_sharded,
    mean_over_ranks,
    uses_grad_scaler,
)


class RLHFModule(CriticExportable, L.LightningModule):
    """RL fine-tuning of a causal LM against a reward, with a KL penalty to the frozen initial model.

    Each ``training_step`` is one iteration on a batch of prompts (manual optimisation): sample responses (KV
    cache, ``rollout_backend``), score the completion texts with ``reward``, compute per-token KL to the reference and
    rewards r_t = -β·kl_t (+ the score on the last token), let ``algorithm`` turn that into advantages, then run
    the optimizer steps of ``algorithm.schedule`` on ``algorithm.loss``. Sampling and scoring go through
    ``generator`` (a ``PolicyGenerator`` over ``models``), which works without any algorithm too. Note that
    ``trainer.global_step`` (and so ``trainer.max_steps``) counts optimizer steps, not iterations; bound iterations
    with ``max_iterations``. Forwards run with dropout off, so the first
    minibatch's ratio π/π_old is exactly 1. Don't set ``trainer.gradient_clip_val``: use ``max_grad_norm``.

    Args:
        policy: Causal LM to fine-tune: a bundled name (``smollm2-135m-instruct``, ``tiny-llama``), hub id or path.
            Its tokenizer is the data's tokenizer (the CLI links ``model.policy`` to ``data.tokenizer``).
        reward: Scores completions: any callable ``(prompts, completions) -> Tensor | list[float]`` of shape (N,).
            In YAML, a ``class_path`` (e.g. ``lit_rlhf.rewards.SentimentReward``, ``lit_rlhf.reward.RewardModel``)
            or the dotted import path of a function. Only text crosses this boundary. Required for training.
        algorithm: The RL algorithm (``lit_rlhf.rl.PPO``, ``A2C``, ``NLPO``, ``RLOO`` or your own
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
            decay to 0 at ``schedule_iterations``, which settles the policy instead of drifting with the last updates.
        schedule_iterations: Iterations the schedule spans; None: ``max_iterations``, else the Trainer's estimate of
            training batches (``max_epochs`` × batches per epoch).
        max_iterations: Stop fitting after this many RL iterations, wherever that falls in an epoch of prompts (not
            ``trainer.max_steps``: that counts optimizer steps, several per iteration); None: the Trainer decides.
        optimizer: Optimizer factory over parameter groups, e.g. ``torch.optim.AdamW`` or a bitsandbytes 8-bit
            optimizer; the groups' learning rates come from ``learning_rate`` / ``value_learning_rate``.
            None: AdamW without weight decay, fused into one kernel where the device has one (``finetuning.adamw``).
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
        reference_dtype: Without LoRA, store the frozen reference's transformer layers in this dtype (``bfloat16``:
            half the memory of float32 layers, 213 MB less for SmolLM2-135M); None: ``dtype``. Under ``bf16-mixed``
            autocast computes those matmuls in bfloat16 either way; the embeddings and the LM head keep ``dtype``, so
            the log-probs keep their precision. Needs a ``-mixed`` Trainer precision when it differs from ``dtype``.
        gradient_checkpointing: Recompute decoder layers' activations in the update's backward (policy and separate
            value trunk): less memory, ~a third more compute. Under FSDP use ``activation_checkpointing_policy``.
        rollout_backend: ``native``: our decoding loop (``lit_rlhf.rl.decoding.sample``; faster than ``generate`` on
            a CPU, same distribution and greedy output; under multi-process FSDP it hands over to ``generate``);
            ``hf``: HF ``generate``; ``vllm``: a colocated vLLM engine (CUDA, ``pip install lit-rlhf[vllm]``) refreshed
            after every update. Algorithms with a sampling logits processor (NLPO) need ``native`` or ``hf``.
        vllm: vLLM engine settings when ``rollout_backend`` is ``vllm``; None uses ``VLLMOptions()``.
        rollout_seed: Reseed torch from (rollout_seed, iteration, rank) at the start of every iteration, so that a
            resumed run repeats the uninterrupted one exactly whatever happened in between; None keeps the global
            RNG stream (whose state is still checkpointed). Named apart from the data module's shuffle ``seed``.
        ptx_coef: γ of PPO-ptx (Ouyang et al. 2022, eq. 2: objective + γ·E_pretrain[log π]): every optimizer step
            adds γ × the language-modelling loss of a share of the iteration's ptx rows (the data module's
            ``ptx_path``), logged as ``ptx/loss``. 0 disables.
        attn_implementation: transformers' attention kernel (``eager``, ``sdpa``, ...) for policy, reference and value
            trunk; None: transformers' default (``sdpa``). On a CPU ``eager`` runs the update's backward faster at short
            lengths (bench/README.md: 0.710 against 0.875 s for SmolLM2), with memory quadratic in the length.
        trainable_layers: Train only the top this many decoder layers of the policy (and of a separate value trunk),
            the final norm and an untied LM head (SmolLM2's is tied to the input embedding and stays frozen); the rest
            gets no gradient or optimizer state, and the backward stops at the lowest trained layer. With ``lora``,
            adapters go on those layers only. None, or the number of layers, trains everything (``train_top_layers``).
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
        max_iterations: int | None = None,
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
        reference_dtype: DType | None = None,
        gradient_checkpointing: bool = False,
        rollout_backend: Literal["native", "hf", "vllm"] = "native",
        vllm: VLLMOptions | None = None,
        attn_implementation: str | None = None,
        trainable_layers: int | None = None,
        ptx_coef: float = 0.0,
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters()
        make_plain(self)  # components as class_path / init_args: checkpoints load with weights_only=True
        self.automatic_optimization = False
        self.algorithm = algorithm if algorithm is not None else PPO()
        critic = check_arguments({**arguments, "algorithm": self.algorithm})
        self.kl = kl if kl is not None else FixedKL()
        self.kl_estimator = kl_estimator
        self.generation = generation
        self.learning_rate, self.value_learning_rate = learning_rate, value_learning_rate
        self.scheduler, self.schedule_iterations = scheduler, schedule_iterations or max_iterations
        self.max_iterations = max_iterations
        self._optimizer_factory = optimizer
        self.max_grad_norm, self.gradient_accumulation_steps = max_grad_norm, gradient_accumulation_steps
        self.shaping = RewardShaping(missing_eos_penalty, normalize_reward, reward_clip)
        self.degeneration = DegenerationWarnings()
        self.rollout_seed = rollout_seed
        self.iteration = 0
        self.rollout_backend, self.vllm_options, self.lora = rollout_backend, vllm or VLLMOptions(), lora
        self.ptx_coef = ptx_coef

        self.tokenizer = load_tokenizer(policy, padding_side="left")
        self.models = PolicyModels.load(policy, critic=critic, **PolicyModels.options(arguments))
        self.algorithm.setup(self.policy)
        self.generator = PolicyGenerator(self.models, self.tokenizer, generation, reward)
        self.generator.sampler = self._sampler()

    @property
    def policy(self) -> nn.Module:
        """The policy being trained (``models.policy``; a peft model with LoRA)."""
        return self.models.policy

    def _sampler(self) -> Sampler:
        world_size = self.trainer.world_size if self._trainer is not None else 1
        path = resolve(self.hparams.policy)
        options = (self.vllm_options, path, self.lora, world_size)
        return make_sampler(
            self.rollout_backend, self.tokenizer, self.generator.stop_token_ids, is_sharded(self), *options
        )

    def setup(self, stage: str) -> None:
        check_strategy(self, quantised=is_quantised(self.policy))
        if str(self.trainer.precision).endswith("-mixed"):
            # Autocast trunk, full-precision logits: log-probs, KL and ratios keep their meaning (see the helper).
            self.models.full_precision_heads()
        elif self.hparams.reference_dtype not in (None, self.hparams.dtype):
            raise ValueError(
                f"model.reference_dtype: {self.hparams.reference_dtype} needs trainer.precision bf16-mixed."
            )
        if self.rollout_backend == "vllm" and is_sharded(self):
            raise ValueError("rollout_backend: vllm needs whole weights on every rank: use strategy: ddp, not FSDP.")
        self.generator.sampler = self._sampler()

    def policy_outputs(self, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> PolicyOutputs:
        """The policy's log-probs, entropy and values on the response, through the algorithm's logits transform;
        (B, P+T) -> PolicyOutputs of (B, T)."""
        transform = self.algorithm.logits_transform(self.policy, sequences, attention_mask, prompt_length)
        temperature, banned = self.generation.logprob_temperature, self.generator.banned()
        return self.models.outputs(sequences, attention_mask, prompt_length, temperature, transform, banned=banned)

    # --- the iteration ---------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        batch, ptx = (batch["prompts"], batch["ptx"]) if "ptx" in batch else (batch, None)
        if self.ptx_coef > 0 and ptx is None:
            raise ValueError("model.ptx_coef > 0 needs text to keep the likelihood of: set data.ptx_path.")
        if self.rollout_seed is not None:
            seed_iteration(self.rollout_seed, self.iteration, self.global_rank)
        self.eval()  # no dropout: rollout and update forwards must agree
        self.algorithm.on_iteration_start(self.policy, self.iteration)
        start = time.perf_counter()
        rollout = self.generator.rollout(batch, self.algorithm, keep_graph=self.update_reuses_rollout_forward())
        samples = rollout.samples
        scores = self.shaping(rollout.raw_scores, samples.stopped, partial(gather_flat, self))
        experience = to_experience(rollout, scores, self.kl_estimator, self.kl.coef)
        rollout_time = time.perf_counter() - start
        with torch.no_grad():
            advantages, returns = self.algorithm.advantages(experience)
        experience = dataclasses.replace(experience, advantages=advantages, returns=returns)
        start = time.perf_counter()
        with self.generator.sampler.released():
            update_metrics = self._update(experience, rollout.graph, ptx if self.ptx_coef > 0 else None)
        check_finite(self.parameters(), f"RLHFModule after iteration {self.iteration}'s update", FINITE_ADVICE)
        self.generator.sampler.refresh(self.policy)
        update_time = time.perf_counter() - start

        global_kl = gather_flat(self, experience.kl.sum(-1))
        kl_coef = self.kl.coef
        self.kl.update(global_kl.mean().item(), n_steps=global_kl.numel())
        metrics = {
            **iteration_metrics(rollout, experience),
            "objective/kl_coef": torch.tensor(kl_coef),
            "time/rollout": torch.tensor(rollout_time),
            "time/update": torch.tensor(update_time),
            "iteration": torch.tensor(float(self.iteration)),
            "policy/lr": torch.tensor(float(self.optimizers().param_groups[0]["lr"])),
            **update_metrics,
        }
        metrics = mean_over_ranks(self, metrics)
        all_scores = gather_flat(self, rollout.raw_scores)
        metrics["objective/score"] = all_scores.mean().cpu()
        metrics["objective/score_std"] = all_scores.std(unbiased=False).cpu()
        self.degeneration(metrics, self.iteration)
        for prog_bar in (True, False):  # the score and the KL in the progress bar
            shown = {k: v for k, v in metrics.items() if (k in ("objective/score", "objective/kl")) == prog_bar}
            self.log_dict(shown, prog_bar=prog_bar, on_step=True, on_epoch=False, batch_size=experience.batch_size)
        if self.scheduler != "constant":
            self.lr_schedulers().step()
        self.iteration += 1
        if self.max_iterations is not None and self.iteration >= self.max_iterations and self._trainer is not None:
            self.trainer.should_stop = True
        texts = {"prompts": samples.prompts, "completions": samples.completions, "scores": rollout.raw_scores.cpu()}
        return {**texts, "metrics": {key: value.item() for key, value in metrics.items()}}

    def update_reuses_rollout_forward(self) -> bool:
        """Whether this iteration's update starts from the rollout's policy forward (``reuse_rollout_forward``): with
        one minibatch and no accumulation its first pass runs at the rollout's weights on all its rows. Not under
        FSDP, whose units reshard between forward and backward on a schedule of their own."""
        return (
            self.reuse_rollout_forward
            and self.algorithm.schedule.num_minibatches == 1
            and self.gradient_accumulation_steps == 1
            and fsdp_root(self) is None
        )

    def _update(
        self, experience: Experience, first: PolicyOutputs | None = None, ptx: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The optimizer steps of ``algorithm.schedule`` on this iteration's rollout (``lit_rlhf.rl.update``)."""
        return run_update(self, experience, first, ptx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, stage: str = "val") -> None:
        """Sample from the plain policy (no algorithm hooks) and log the raw score and KL to the reference."""
        rollout = self.generator.rollout(batch)
        mask = rollout.samples.response_mask
        kl = kl_estimate(rollout.outputs.logprobs, rollout.ref_logprobs, self.kl_estimator) * mask
        metrics = {
            f"{stage}/score": rollout.raw_scores.mean(),
            f"{stage}/kl": kl.sum(-1).mean(),
            f"{stage}/length": mask.sum(-1).mean(),
            f"{stage}/eos_frac": rollout.samples.stopped.float().mean(),
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=mask.shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As ``validation_step``, logged under ``test/``."""
        self.validation_step(batch, batch_idx, stage="test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[str]]:
        """The plain policy's completions of a batch of prompts (``generation.num_samples`` each, adjacent)."""
        samples = self.generator.samples(batch["prompt"], batch["input_ids"], batch["attention_mask"])
        return {"prompts": samples.prompts, "completions": samples.completions}

    def configure_optimizers(self) -> Any:
        require_trainable(self, [p for p in self.policy.parameters() if p.requires_grad])
        groups = self.models.parameter_groups(self.learning_rate, self.value_learning_rate)
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(groups)
        else:
            optimizer = adamw(groups, self.learning_rate, weight_decay=0.0, fused=not uses_grad_scaler(self))
        if self.scheduler == "constant":
            return optimizer
        total = self.schedule_iterations or max(1, int(self.trainer.estimated_stepping_batches))
        # Stepped once per iteration in training_step (manual optimisation: Lightning does not step it).
        return {"optimizer": optimizer, "lr_scheduler": lr_schedule(optimizer, self.scheduler, total)}

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlhf"] = {
            "iteration": self.iteration,
            "kl": self.kl.state_dict(),
            "reward_moments": self.shaping.moments.state_dict(),
            "rng": rng_state(),
        }
        self.models.drop_reference(checkpoint["state_dict"], prefix="models.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)
        self.models.restore_reference(checkpoint["state_dict"], prefix="models.")
        state = checkpoint.get("rlhf")
        if state is None:
            return
        self.iteration = int(state["iteration"])
        self.kl.load_state_dict(state["kl"])
        self.shaping.moments.load_state_dict(state["reward_moments"])
        set_rng_state(state["rng"])

    def export_model(self) -> tuple[nn.Module, Any]:
        """The policy and its tokenizer (used by ``export`` and ``lit_rlhf.callbacks.HFExportCallback``); the critic,
        if any, exports beside it (``CriticExportable``)."""
        return self.policy, self.tokenizer
