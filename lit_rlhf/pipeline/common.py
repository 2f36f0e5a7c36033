"""What the pipeline's stages share: the output layout, Trainer and sampler construction, annotator and judge choice."""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.judges import BradleyTerryAnnotator, Judge, VaderJudge
from lit_rlhf.pipeline.config import PipelineConfig
from lit_rlhf.reward import RewardModel
from lit_rlhf.rl import GenerationOptions, PolicyGenerator

DEFAULT_ANNOTATOR_TEMPERATURE = 0.1
"""Label noise of the default annotator, in VADER units: a score gap of 0.1 is labelled right about 73% of the time."""


PARTIAL = ".partial"
"""Folder (under the run's root) where a running stage writes: ``.partial/<stage>/`` mirrors the root's layout, and
its outputs replace the old ones only once the stage has finished."""

OUTPUTS: dict[str, tuple[str, ...]] = {
    "collect": ("collect",),
    "reward": ("reward",),
    "rl": ("rl",),
    "evaluate": ("evaluate",),
    "report": ("report.md", "plots"),
}
"""What each stage writes, relative to the run's root."""


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of a run reads and writes, under one output folder."""

    root: Path
    """The run's output folder."""
    writing: str | None = None
    """The stage being run: its outputs resolve under ``.partial/<stage>/``, every other stage's at the root."""

    def _at(self, stage: str, name: str) -> Path:
        return (self.partial(stage) if stage == self.writing else self.root) / name

    def partial(self, stage: str) -> Path:
        """The folder a running ``stage`` writes to."""
        return self.root / PARTIAL / stage

    def staged(self, stage: str) -> RunPaths:
        """These paths as ``stage`` sees them while it runs: its own outputs in its partial folder."""
        return RunPaths(self.root, stage)

    @property
    def markers(self) -> Path:
        """``stages/<stage>.json``: written when a stage finishes (fingerprint, timing, summary)."""
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.markers / f"{stage}.json"

    @property
    def collect(self) -> Path:
        return self._at("collect", "collect")

    @property
    def train_pairs(self) -> Path:
        """Preference pairs for reward-model training (``write_preferences`` format)."""
        return self.collect / "train.jsonl"

    @property
    def val_pairs(self) -> Path:
        """Pairs of held-out prompts, for the reward model's pair accuracy."""
        return self.collect / "val.jsonl"

    @property
    def annotations(self) -> Path:
        """Every labelled pair with the judge's scores and the label probability."""
        return self.collect / "annotations.jsonl"

    @property
    def reward(self) -> Path:
        return self._at("reward", "reward")

    @property
    def reward_model(self) -> Path:
        """The trained reward model as a plain transformers checkpoint (``RewardModel(path)`` loads it)."""
        return self.reward / "model"

    @property
    def rl(self) -> Path:
        return self._at("rl", "rl")

    @property
    def snapshots(self) -> Path:
        """Policy snapshots ``iter-NNNN`` taken during RL."""
        return self.rl / "checkpoints"

    @property
    def rl_metrics(self) -> Path:
        """One JSON line of logged metrics per RL iteration (``MetricsHistory``)."""
        return self.rl / "metrics.jsonl"

    @property
    def evaluate(self) -> Path:
        return self._at("evaluate", "evaluate")

    @property
    def results(self) -> Path:
        """Per-checkpoint metrics, win rate and Elo ratings."""
        return self.evaluate / "results.json"

    @property
    def eval_samples(self) -> Path:
        """Every evaluation sample with its gold and proxy rewards, KL and perplexity."""
        return self.evaluate / "samples.jsonl"

    @property
    def report(self) -> Path:
        return self._at("report", "report.md")

    @property
    def plots(self) -> Path:
        return self._at("report", "plots")


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n" for row in rows)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: missing values are written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def annotator_for(config: PipelineConfig) -> Any:
    """The collect stage's annotator: the configured one, a judge wrapped to prefer its higher score, or the default
    ``BradleyTerryAnnotator(VaderJudge())``."""
    annotator = config.collect.annotator
    if annotator is None:
        return BradleyTerryAnnotator(VaderJudge(), temperature=DEFAULT_ANNOTATOR_TEMPERATURE, seed=config.seed)
    if callable(getattr(annotator, "compare", None)):
        return annotator
    if callable(annotator):
        return BradleyTerryAnnotator(annotator, temperature=0.0, seed=config.seed)
    raise TypeError(
        f"collect.annotator must have compare(prompts, completions_a, completions_b) or be a judge "
        f"(prompts, completions) -> scores; got {type(annotator).__name__}."
    )


def gold_judge_for(config: PipelineConfig) -> Judge:
    """The evaluation's gold judge: ``evaluate.gold_judge``, else the judge behind the annotator."""
    if config.evaluate.gold_judge is not None:
        return config.evaluate.gold_judge
    annotator = config.collect.annotator
    if annotator is None:
        return VaderJudge()
    judge = getattr(annotator, "judge", None)
    if callable(judge):
        return judge
    if callable(annotator):
        return annotator
    raise ValueError(
        f"Cannot tell the gold judge of collect.annotator ({type(annotator).__name__} has no `judge`): "
        "set evaluate.gold_judge."
    )


def prompt_data(config: PipelineConfig, split: str, batch_size: int, limit: int | None) -> PromptDataModule:
    """The pipeline's prompts as ``PromptDataModule`` batches, rendered as every stage renders them: the ``train``
    prompts (shuffled by the seed, with the PPO-ptx stream when ``rl.ptx_coef`` > 0) or the ``heldout`` ones (in
    order)."""
    train = split == "train"
    ptx = train and config.rl.model.get("ptx_coef", 0.0) > 0
    data = PromptDataModule(
        tokenizer=config.policy,
        path=config.train_prompts if train else config.heldout_prompts,
        split=split,
        max_prompt_length=config.max_prompt_length,
        batch_size=batch_size,
        shuffle=train,
        seed=config.seed,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
        limit=limit,
        ptx_path=config.rl.ptx_path if ptx else None,
        ptx_batch_size=config.rl.ptx_batch_size,
    )
    data.setup("fit")
    return data


def reward_model(config: PipelineConfig, paths: RunPaths) -> RewardModel:
    """The reward model the reward stage exported, scoring as it was trained (``reward.max_length``)."""
    return RewardModel(
        str(paths.reward_model), batch_size=config.reward.score_batch_size, max_length=config.reward.max_length
    )


def generator(
    config: PipelineConfig, generation: GenerationOptions, reward: Any | None = None, reference: bool = False
) -> PolicyGenerator:
    """A ``PolicyGenerator`` over the pipeline's policy (with the RL stage's weight dtype), in eval mode; with
    ``reference`` the frozen reference too (LoRA as in RL, on the same layers, so snapshots load onto it)."""
    lora = config.rl.model.get("lora") if reference else None
    layers = config.rl.model.get("trainable_layers") if lora is not None else None
    return PolicyGenerator.load(
        config.policy,
        generation,
        reward,
        lora=lora,
        trainable_layers=layers,
        dtype=config.rl.model.get("dtype", "float32"),
        reference=reference,
    )


def sampling_precision(config: PipelineConfig, generator: PolicyGenerator) -> AbstractContextManager:
    """Autocast for sampling outside a Trainer (collect) under ``precision: bf16-mixed``, with the LM head kept in
    float32 as the RL stage keeps it; a no-op context under ``32-true``."""
    if config.precision == "32-true":
        return nullcontext()
    generator.models.full_precision_heads()
    return torch.autocast(device_type=generator.device.type, dtype=torch.bfloat16)


def make_trainer(config: PipelineConfig, options: dict[str, Any], **settings: Any) -> L.Trainer:
    """A Trainer from a stage's typed ``trainer`` options (the pipeline's defaults already in them), with the stage's
    own ``settings`` (callbacks, output folder, length); precision and progress bar follow the pipeline's unless the
    stage sets them."""
    options = {
        **options,
        "precision": options.get("precision") or config.precision,
        "enable_progress_bar": config.progress_bar
        if options.get("enable_progress_bar") is None
        else options["enable_progress_bar"],
    }
    return L.Trainer(**options, **settings)
