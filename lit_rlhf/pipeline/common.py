"""What the pipeline's stages share: the output layout, Trainer and sampler construction, annotator and judge choice."""

from __future__ import annotations

import importlib
import json
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_rlhf.judges import BradleyTerryAnnotator, Judge, VaderJudge
from lit_rlhf.models import LoraOptions
from lit_rlhf.pipeline.config import PipelineConfig
from lit_rlhf.rl import PPO, GenerationOptions, RLHFModule
from lit_rlhf.rl.rollout import full_precision_head

DEFAULT_ANNOTATOR_TEMPERATURE = 0.1
"""Label noise of the default annotator, in VADER units: a score gap of 0.1 is labelled right about 73% of the time."""


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of a run writes, under one output folder."""

    root: Path
    """The run's output folder."""

    @property
    def markers(self) -> Path:
        """``stages/<stage>.json``: written when a stage finishes (fingerprint, timing, summary)."""
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.markers / f"{stage}.json"

    @property
    def collect(self) -> Path:
        return self.root / "collect"

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
        return self.root / "reward"

    @property
    def reward_model(self) -> Path:
        """The trained reward model as a plain transformers checkpoint (``RewardModel(path)`` loads it)."""
        return self.reward / "model"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

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
        return self.root / "evaluate"

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
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def outputs(self, stage: str) -> list[Path]:
        """What a stage writes, removed before it runs again so nothing stale survives (old snapshots, say)."""
        return {
            "collect": [self.collect],
            "reward": [self.reward],
            "rl": [self.rl],
            "evaluate": [self.evaluate],
            "report": [self.report, self.plots],
        }[stage]


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


def fresh(component: Any) -> Any:
    """A new instance for a jsonargparse ``lazy_instance`` default, whose attributes exist only once it is built;
    anything else unchanged. Also keeps a stateful default (a KL controller) from carrying over between runs."""
    init_data = getattr(component, "lazy_get_init_data", None)
    if init_data is None:
        return component
    data = init_data().as_dict()
    module, _, name = data["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**data.get("init_args", {}))


def annotator_for(config: PipelineConfig) -> Any:
    """The collect stage's annotator: the configured one, a judge wrapped to prefer its higher score, or the default
    ``BradleyTerryAnnotator(VaderJudge())``."""
    annotator = fresh(config.collect.annotator)
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
        return fresh(config.evaluate.gold_judge)
    annotator = fresh(config.collect.annotator)
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


def sampler(
    config: PipelineConfig,
    generation: GenerationOptions,
    lora: LoraOptions | None = None,
    reward: Any | None = None,
) -> RLHFModule:
    """An ``RLHFModule`` used only to sample and score (``generate`` / ``rollout(hooks=False)``), never trained.

    Its critic is a single linear head (``value_model="shared"``), the cheapest that ``PPO`` accepts; its KL estimator
    is ``k1``, so a response's KL is the plain sum of log π − log π_ref over its tokens.
    """
    module = RLHFModule(
        policy=config.policy,
        reward=reward,
        algorithm=PPO(),
        value_model="shared",
        kl_estimator="k1",
        generation=generation,
        lora=lora,
        dtype=config.dtype,
    )
    return module.eval()


def sampling_precision(config: PipelineConfig, module: RLHFModule) -> AbstractContextManager:
    """Autocast for sampling outside a Trainer (collect) under ``precision: bf16-mixed``, with the LM head kept in
    float32 as the RL stage keeps it; a no-op context under ``32-true``."""
    if config.precision == "32-true":
        return nullcontext()
    full_precision_head(module.policy)
    return torch.autocast(device_type=module.device.type, dtype=torch.bfloat16)


def make_trainer(config: PipelineConfig, overrides: dict[str, Any], **settings: Any) -> L.Trainer:
    """A Trainer with the pipeline's defaults (one device, no logger or Lightning checkpoints: each stage saves
    its own outputs), then ``settings``, then the user's ``overrides`` from the stage's ``trainer`` field."""
    options: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": config.progress_bar,
        "precision": config.precision,
    }
    options.update(settings)
    options.update(overrides)
    return L.Trainer(**options)
