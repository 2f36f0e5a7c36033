"""The pipeline's configuration: a documented dataclass per stage; jsonargparse turns the docstrings into ``--help``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from jsonargparse import lazy_instance

from lit_rlhf.judges import BradleyTerryAnnotator, Judge
from lit_rlhf.models import DType, LoraOptions
from lit_rlhf.rl.kl import AdaptiveKL, KLController, KLEstimator
from lit_rlhf.rl.optimizers import PPO, PolicyOptimizer
from lit_rlhf.rl.rollout import GenerationOptions

__all__ = ["CollectConfig", "EvaluateConfig", "PipelineConfig", "RLConfig", "ReportConfig", "RewardConfig"]


@dataclass
class CollectConfig:
    """Stage 1, collect: sample K completions per training prompt and have a simulated annotator label the pairs."""

    num_prompts: int | None = None
    """Use only the first this many training prompts; None uses all of them."""
    generation: GenerationOptions = field(default_factory=lambda: GenerationOptions(max_new_tokens=48, num_samples=4))
    """How completions are sampled; ``num_samples`` is K: every pair of a prompt's K completions is labelled."""
    annotator: BradleyTerryAnnotator | Judge | None = None
    """Labels the pairs: an object with ``compare(prompts, completions_a, completions_b) -> list[Preference]`` (e.g.
    ``lit_rlhf.judges.BradleyTerryAnnotator``), or any judge ``(prompts, completions) -> scores``, which then
    prefers the higher score. None: ``BradleyTerryAnnotator(VaderJudge(), temperature=0.1)``."""
    batch_size: int = 16
    """Prompts per generation batch (each gives K rows)."""
    val_fraction: float = 0.1
    """Share of the prompts whose pairs are held out to measure the reward model's pair accuracy."""
    drop_ties: bool = True
    """Leave out pairs the annotator marks as ties (equal judge scores): their label is a coin flip."""


@dataclass
class RewardConfig:
    """Stage 2, reward model: a Bradley–Terry reward model (``RewardModelModule``) fitted to the collected pairs."""

    backbone: str = "all-minilm-l6-v2"
    """Reward-model trunk: bundled name, hub id or path (any one-label sequence classifier or a causal LM)."""
    max_length: int = 128
    """Token budget per (prompt, response), in training and when the RL stage scores; the prompt is cut first."""
    batch_size: int = 16
    """Pairs per training batch."""
    epochs: int = 2
    """Passes over the training pairs."""
    learning_rate: float = 5e-5
    """Peak learning rate (AdamW, linear warm-up and decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Share of the optimizer steps spent warming up."""
    center_rewards_coefficient: float = 0.01
    """Weight of the term that keeps rewards centred on 0, so the RL stage sees a stable scale; 0 turns it off."""
    lora: LoraOptions | None = None
    """LoRA adapters on the backbone instead of training every weight."""
    score_batch_size: int = 32
    """Texts per forward pass when the exported reward model scores (held-out pairs, RL, evaluation)."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """Extra ``lightning.Trainer`` keyword arguments (``accelerator``, ``devices``, ``precision``, ``strategy`` ...);
    they override the pipeline's own settings."""


@dataclass
class RLConfig:
    """Stage 3, RL: fine-tune the policy against the learned reward model (``RLHFModule``) with a KL penalty."""

    iterations: int = 40
    """RL iterations: each samples ``batch_size`` prompts, scores them and updates the policy."""
    batch_size: int = 16
    """Prompts per iteration."""
    num_prompts: int | None = None
    """Use only the first this many training prompts; None uses all of them."""
    algorithm: PolicyOptimizer = field(default_factory=lambda: lazy_instance(PPO, epochs=2))
    """The RL algorithm by ``class_path``: ``lit_rlhf.rl.PPO``, ``A2C``, ``NLPO`` or your own ``PolicyOptimizer``."""
    kl: KLController = field(default_factory=lambda: lazy_instance(AdaptiveKL, init_coef=0.1, target=3.0, horizon=2000))
    """KL coefficient controller: ``lit_rlhf.rl.AdaptiveKL`` (Ziegler et al. 2019) or ``lit_rlhf.rl.FixedKL``."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator in the penalty: ``k1`` (log π − log π_ref) or ``k3``."""
    generation: GenerationOptions = field(default_factory=lambda: GenerationOptions(max_new_tokens=32))
    """How rollouts are sampled (length, temperature, samples per prompt); evaluation samples the same way."""
    lora: LoraOptions | None = field(default_factory=LoraOptions)
    """LoRA adapters on the policy (the reference is the same model with the adapter off); None trains every weight
    and keeps a frozen copy as the reference."""
    value_model: Literal["separate", "shared", "none"] | None = "shared"
    """The critic: ``shared`` (a head on the policy's last hidden state: cheapest on a CPU), ``separate`` (its own
    trunk) or ``none``; None lets the algorithm decide."""
    learning_rate: float = 1e-4
    """Learning rate of the policy's trainable weights."""
    value_learning_rate: float | None = None
    """Learning rate of the critic; None uses ``learning_rate``."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over the ``iterations``: ``linear`` / ``cosine`` decay to 0 at the last one."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm before each step; None disables."""
    normalize_reward: bool = True
    """Standardise reward-model scores with running statistics (a learned reward's scale is arbitrary)."""
    reward_clip: float | None = None
    """Clip scores to [−reward_clip, reward_clip] after normalisation; None disables."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that run out of tokens without stopping; None disables."""
    checkpoint_every: int = 10
    """Save a policy snapshot (the LoRA adapter, or the full model without LoRA) every this many iterations; the
    last iteration is always saved. Evaluation compares them all."""
    export_final: bool = True
    """Also save the final policy as a plain transformers checkpoint (LoRA merged) in ``rl/hf/final``."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """Extra ``lightning.Trainer`` keyword arguments; they override the pipeline's own settings."""


@dataclass
class EvaluateConfig:
    """Stage 4, evaluate: sample from the initial policy, every snapshot and the final policy on held-out prompts."""

    num_prompts: int | None = None
    """Use only the first this many held-out prompts; None uses all of them."""
    samples_per_prompt: int = 2
    """Completions per prompt and checkpoint, sampled as in RL (``rl.generation``)."""
    batch_size: int = 16
    """Prompts per generation batch."""
    gold_judge: Judge | None = None
    """The gold judge (true preference) for gold reward, win rate and Elo; None uses the annotator's judge."""


@dataclass
class ReportConfig:
    """Stage 5, report: ``report.md`` with tables, plots and sample responses."""

    num_samples: int = 8
    """Rows in the before/after table of sample responses."""
    max_chars: int = 240
    """Cut longer texts in the report's tables."""


@dataclass
class PipelineConfig:
    """The whole RLHF recipe: collect preferences → reward model → RL → evaluate → report, offline on a CPU."""

    name: str = "demo"
    """Run name; the outputs go to ``outputs/<name>`` unless ``output_dir`` is set."""
    output_dir: str | None = None
    """Where every stage writes; None: ``outputs/<name>``."""
    policy: str = "smollm2-135m-instruct"
    """The language model to align: bundled name, hub id or local path."""
    train_prompts: str | None = None
    """Prompts for collection and RL: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file with a ``prompt`` or
    ``messages`` field, a dataset folder or a hub name; None: the packaged ``train`` set."""
    heldout_prompts: str | None = None
    """Prompts for evaluation, same kinds of source; None: the packaged ``heldout`` set."""
    chat_template: bool = True
    """Render each prompt as a user message with the policy's chat template."""
    system_prompt: str | None = None
    """System message put before every prompt."""
    max_prompt_length: int = 128
    """Longest prompt in policy tokens; longer prompts lose their beginning."""
    dtype: DType = "float32"
    """Weight dtype of the policy."""
    precision: Literal["32-true", "bf16-mixed"] = "32-true"
    """Compute precision of the training stages (the Trainer's ``precision``) and of collect's sampling. ``bf16-mixed``
    keeps float32 weights and LM head and runs the rest under bfloat16 autocast: faster on GPUs and on CPUs with bf16
    matmul instructions (AVX-512 BF16, AMX; 1.65x per RL iteration on this project's CPU), slower where bf16 is
    emulated. Evaluation always runs in float32, so KL and perplexity are measured at full precision."""
    seed: int = 0
    """Seed of sampling, data splits, label noise and training."""
    num_threads: int | None = None
    """CPU threads per torch op for the run; None keeps torch's default (one per core). On a CPU shared with other
    jobs, 1 can be several times faster: threads that wait on each other at every small matmul stall."""
    progress_bar: bool = True
    """Show progress bars."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """Stage 1 settings."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Stage 2 settings."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Stage 3 settings."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Stage 4 settings."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """Stage 5 settings."""
