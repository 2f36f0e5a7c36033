"""The pipeline's configuration. The training stages' sections are typed from their modules' own signatures
(``reward:`` holds ``RewardModelModule``'s arguments, ``rl:`` ``RLHFModule``'s, each with a typed ``trainer:``),
beside a few stage options; the other sections are documented dataclasses. jsonargparse turns it all into ``--help``."""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
from jsonargparse import ArgumentParser, Namespace

from lit_rlhf.judges import BradleyTerryAnnotator, Judge
from lit_rlhf.rl.decoding import GenerationOptions

__all__ = [
    "CollectConfig",
    "EvaluateConfig",
    "PipelineConfig",
    "RLConfig",
    "ReportConfig",
    "RewardConfig",
    "add_arguments",
    "from_namespace",
    "validate",
]

TRAINER_OWNED = {"callbacks", "default_root_dir", "max_epochs"}
"""Trainer arguments each stage sets itself (its callbacks, its output folder, its length in epochs)."""
TRAINER_DEFAULTS: dict[str, Any] = {
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
"""The pipeline's Trainer defaults: one device, no logger or Lightning checkpoints (each stage saves its own outputs).
``precision`` and ``enable_progress_bar`` left unset follow the pipeline's ``precision`` and ``progress_bar``."""


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
    format: Literal["pairs", "rankings"] = "pairs"
    """What ``collect/train.jsonl`` and ``val.jsonl`` hold. ``pairs``: every labelled pair as a
    ``prompt``/``chosen``/``rejected`` row. ``rankings``: one ``prompt``/``responses``/``scores`` row per prompt
    (InstructGPT's K-wise comparisons), each distinct completion scored by the share of its labelled pairs it won,
    so the reward model scores each completion once instead of once per pair. Completions with equal shares are not
    compared, and where the labels contradict each other (a beat b, b beat c, c beat a) the ranking overrules some of
    them. ``annotations.jsonl``, and the reward stage's held-out accuracy, keep the pair labels either way."""


@dataclass
class RewardConfig:
    """Stage 2, reward model: ``RewardModelModule`` fitted to the collected pairs. The section takes every argument
    of ``RewardModelModule`` (``backbone``, ``lora``, ``learning_rate`` ...), these stage options and ``trainer``."""

    max_length: int = 128
    """Token budget per (prompt, response), in training and when the RL stage scores; the prompt is cut first."""
    batch_size: int = 16
    """Pairs per training batch."""
    epochs: int = 2
    """Passes over the training pairs."""
    score_batch_size: int = 32
    """Texts per forward pass when the exported reward model scores (held-out pairs, RL, evaluation)."""
    model: dict[str, Any] = field(default_factory=dict)
    """``RewardModelModule``'s keyword arguments (the section's other keys)."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """``lightning.Trainer`` keyword arguments (``accelerator``, ``devices``, ``strategy`` ...) over the pipeline's."""


@dataclass
class RLConfig:
    """Stage 3, RL: ``RLHFModule`` against the learned reward model, with a KL penalty. The section takes every
    argument of ``RLHFModule`` (a recipe's ``model:`` block pastes here), these stage options and ``trainer``."""

    iterations: int = 40
    """RL iterations: each samples ``batch_size`` prompts, scores them and updates the policy."""
    batch_size: int = 16
    """Prompts per iteration."""
    num_prompts: int | None = None
    """Use only the first this many training prompts; None uses all of them."""
    checkpoint_every: int = 10
    """Save a policy snapshot (the LoRA adapter, or the full model without LoRA) every this many iterations; the
    last iteration is always saved. Evaluation compares them all."""
    export_final: bool = True
    """Also save the final policy as a plain transformers checkpoint (LoRA merged) in ``rl/hf/final``."""
    ptx_path: str | None = None
    """PPO-ptx text (SFT rows: ``prompt``/``completion``, ``messages`` or hh-rlhf ``chosen``), used when
    ``rl.ptx_coef`` > 0; see ``PromptDataModule.ptx_path``."""
    ptx_batch_size: int = 4
    """ptx rows per RL iteration."""
    model: dict[str, Any] = field(default_factory=dict)
    """``RLHFModule``'s keyword arguments (the section's other keys; ``policy`` is the pipeline's)."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """``lightning.Trainer`` keyword arguments over the pipeline's."""


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
    best_of_n: list[int] = field(default_factory=list)
    """Also evaluate best-of-n of the initial policy against the reward model as baselines, one per n here (e.g.
    ``[4, 16]``): each of the ``samples_per_prompt`` samples is the best of n fresh candidates, judged by the gold
    judge like every checkpoint, at the analytic KL log n − (n − 1)/n. Each n costs about n times the initial
    policy's sampling and reward scoring; empty: none."""


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


def _training_sections() -> dict[str, tuple[type, type, set[str], dict[str, Any]]]:
    """section -> (its options dataclass, the LightningModule whose arguments it holds, arguments the pipeline sets
    itself, the section's own Trainer defaults). ``add_arguments`` links the arguments derived from others."""
    from lit_rlhf.reward import RewardModelModule
    from lit_rlhf.rl import RLHFModule

    return {
        "reward": (RewardConfig, RewardModelModule, set(), {}),
        # The policy is the pipeline's. No validation loop: evaluation is its own stage, on every snapshot.
        "rl": (RLConfig, RLHFModule, {"policy"}, {"limit_val_batches": 0}),
    }


def add_arguments(parser: ArgumentParser) -> None:
    """Every option of ``PipelineConfig`` (docstrings as help), the training stages' module and Trainer arguments
    included, with the links that derive the RL stage's seed and schedule length."""
    sections = _training_sections()
    later = {"evaluate": EvaluateConfig, "report": ReportConfig}  # added after the training stages: pipeline order
    parser.add_class_arguments(PipelineConfig, nested_key=None, fail_untyped=True, skip=set(sections) | set(later))
    for key, (options, module, owned, trainer_defaults) in sections.items():
        parser.add_class_arguments(module, key, skip=owned, instantiate=False, sub_configs=True)
        _add_dataclass_fields(parser, options, key, skip={"model", "trainer"})
        trainer = f"{key}.trainer"
        parser.add_class_arguments(L.Trainer, trainer, skip=TRAINER_OWNED, instantiate=False, sub_configs=True)
        defaults = {**TRAINER_DEFAULTS, **trainer_defaults}
        parser.set_defaults({f"{trainer}.{name}": value for name, value in defaults.items()})
    for key, options in later.items():
        parser.add_class_arguments(options, key, fail_untyped=True)
    parser.add_argument(
        "--rl.policy",
        type=str | None,
        default=None,
        help="The top-level policy is trained; accepted here only so that a recipe's model: block pastes as it is.",
    )
    # Derived, so never set by hand: the rollouts' seed is the run's, the module stops after the stage's iterations
    # (and its learning-rate schedule spans them unless rl.schedule_iterations says otherwise).
    parser.link_arguments("seed", "rl.rollout_seed")
    parser.link_arguments("rl.iterations", "rl.max_iterations")


def _add_dataclass_fields(parser: ArgumentParser, cls: type, key: str, skip: set[str]) -> None:
    """The fields of ``cls`` as ``--{key}.{field}`` options in an existing group (jsonargparse allows one class
    group per key), with the types and attribute docstrings jsonargparse would give them."""
    from docstring_parser import parse_from_object

    hints = typing.get_type_hints(cls)
    docs = {param.arg_name: param.description for param in parse_from_object(cls).params}
    for item in dataclasses.fields(cls):
        if item.name not in skip:
            parser.add_argument(
                f"--{key}.{item.name}", type=hints[item.name], default=item.default, help=docs[item.name]
            )


def from_namespace(init: Namespace) -> PipelineConfig:
    """The typed configuration from a parsed and instantiated namespace."""
    values = {f.name: init[f.name] for f in dataclasses.fields(PipelineConfig) if f.name in init}
    for key, (options, *_) in _training_sections().items():
        section = vars(init[key]).copy()
        trainer = vars(section.pop("trainer")).copy()
        stage = {f.name: section.pop(f.name) for f in dataclasses.fields(options) if f.name in section}
        values[key] = options(**stage, model=section, trainer=trainer)
    config = PipelineConfig(**values)
    _critic_for_the_algorithm(config.rl)
    return config


def _critic_for_the_algorithm(rl: RLConfig) -> None:
    """``rl.value_model`` chooses the critic of algorithms that have one; an algorithm without (RLOO, GRPO,
    REINFORCE++) gets none, so that swapping ``rl.algorithm`` needs no other edit."""
    algorithm = rl.model.get("algorithm")
    if algorithm is not None and not algorithm.needs_critic and rl.model.get("value_model") not in (None, "none"):
        logging.getLogger(__name__).info(
            "rl.value_model: %s is left out: %s uses no critic.", rl.model["value_model"], type(algorithm).__name__
        )
        rl.model["value_model"] = None


def validate(config: PipelineConfig) -> None:
    """Fail before the first stage runs on settings that would fail later, naming the keys as the user wrote them:
    stage options out of range, module arguments that cannot work together, Trainer options Lightning rejects."""
    from lit_rlhf.finetuning import check_finetuning_arguments
    from lit_rlhf.freezing import check_trainable_layers
    from lit_rlhf.rl.checks import check_arguments

    for key, value, low in (
        ("collect.generation.num_samples", config.collect.generation.num_samples, 2),
        ("collect.batch_size", config.collect.batch_size, 1),
        ("reward.batch_size", config.reward.batch_size, 1),
        ("reward.epochs", config.reward.epochs, 1),
        ("reward.max_length", config.reward.max_length, 2),
        ("rl.iterations", config.rl.iterations, 1),
        ("rl.batch_size", config.rl.batch_size, 1),
        ("rl.checkpoint_every", config.rl.checkpoint_every, 1),
        ("evaluate.samples_per_prompt", config.evaluate.samples_per_prompt, 1),
        ("max_prompt_length", config.max_prompt_length, 1),
    ):
        if value < low:
            raise ValueError(f"{key} must be >= {low}, got {value}.")
    best_of_n = config.evaluate.best_of_n
    if any(n < 1 for n in best_of_n) or len(set(best_of_n)) < len(best_of_n):
        raise ValueError(f"evaluate.best_of_n must hold distinct n >= 1, got {best_of_n}.")
    if not 0.0 <= config.collect.val_fraction < 1.0:
        raise ValueError(f"collect.val_fraction must be in [0, 1), got {config.collect.val_fraction}.")
    if config.rl.model.get("ptx_coef", 0.0) > 0 and config.rl.ptx_path is None:
        raise ValueError("rl.ptx_coef > 0 needs text to keep the likelihood of: set rl.ptx_path.")
    if config.rl.model.get("policy") not in (None, config.policy):
        raise ValueError(
            f"rl.policy ({config.rl.model['policy']}) is not the pipeline's policy ({config.policy}): every stage "
            "samples, trains and evaluates one policy; set the top-level policy instead."
        )
    check_finetuning_arguments(config.reward.model, prefix="reward.")
    check_arguments({**config.rl.model, "policy": config.policy}, prefix="rl.")
    for key, model in (("reward", config.reward.model.get("backbone")), ("rl", config.policy)):
        layers = getattr(config, key).model.get("trainable_layers")
        if layers is not None and model is not None:
            check_trainable_layers(layers, _layer_count(model), f"{key}.", model)
    quiet = logging.getLogger("lightning.pytorch")
    level, quiet.level = quiet.level, logging.WARNING  # Trainer() announces its accelerator on every call
    try:
        for key in ("reward", "rl"):
            trainer = copy.deepcopy(getattr(config, key).trainer)  # a Trainer takes ownership of strategy objects
            try:
                L.Trainer(**{**trainer, "precision": trainer.get("precision") or config.precision})
            except Exception as error:
                raise ValueError(f"{key}.trainer: {error}") from error
    finally:
        quiet.level = level


def _layer_count(model: str) -> int | None:
    """The number of transformer layers in ``model``'s config (bundled name, hub id or path), or None when it cannot
    be read before the stages run (the stage that loads the model then says why)."""
    from transformers import AutoConfig

    from lit_rlhf.models import resolve

    try:
        return getattr(AutoConfig.from_pretrained(resolve(model)), "num_hidden_layers", None)
    except (OSError, ValueError, ImportError):
        return None
