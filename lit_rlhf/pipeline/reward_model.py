"""Stage 2: fit a Bradley–Terry reward model to the collected pairs or rankings, export it, and measure held-out pair
accuracy."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lit_rlhf.data import PreferenceDataModule, RankingExample
from lit_rlhf.pipeline.collect import comparisons_in
from lit_rlhf.pipeline.common import RunPaths, make_trainer, reward_model
from lit_rlhf.pipeline.config import PipelineConfig
from lit_rlhf.reporting import read_jsonl
from lit_rlhf.reward import RewardModelModule


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher (a tie counts as wrong).

    Shape: chosen (N,), rejected (N,) -> scalar.
    """
    return float((chosen > rejected).float().mean()) if chosen.numel() else float("nan")


def run_reward(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Train ``RewardModelModule`` on ``collect/train.jsonl`` (pairs or rankings, as collect wrote them), export it to
    ``reward/model``, score held-out pairs."""
    rc = config.reward
    backbone = rc.model["backbone"]
    has_val = paths.val_pairs.stat().st_size > 0  # collect writes an empty file when no prompt is held out
    data = PreferenceDataModule(
        tokenizer=backbone,
        train_path=str(paths.train_pairs),
        val_path=str(paths.val_pairs) if has_val else None,
        max_length=rc.max_length,
        batch_size=rc.batch_size,
        seed=config.seed,
    )
    L.seed_everything(config.seed, verbose=False)
    module = RewardModelModule(**rc.model)
    trainer = make_trainer(config, rc.trainer, max_epochs=rc.epochs, default_root_dir=str(paths.reward))
    trainer.fit(module, datamodule=data)
    module.export(paths.reward_model)

    summary: dict[str, Any] = {
        "backbone": backbone,
        "train_pairs": comparisons_in(data.examples["train"]),
        "val_pairs": comparisons_in(data.examples.get("val", [])),
        "epochs": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "final_train_loss": _metric(trainer, "train/loss"),
    }
    if data.examples["train"] and isinstance(data.examples["train"][0], RankingExample):
        summary["train_rankings"] = len(data.examples["train"])
        summary["ranking_loss"] = module.hparams.ranking_loss
    if has_val:
        summary.update(held_out_accuracy(config, paths))
    return summary


def held_out_accuracy(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Pair accuracy of the exported model on the held-out prompts' pairs, against the annotator's (noisy) labels and
    against the judge's own ordering (pairs with equal judge scores left out)."""
    scorer = reward_model(config, paths)
    rows = [a for a in read_jsonl(paths.annotations) if a.get("split") == "val"]
    if config.collect.drop_ties:
        rows = [a for a in rows if not a.get("tie")]
    prompts = [a["prompt"] for a in rows]
    chosen = scorer(prompts, [a["chosen"] for a in rows])
    rejected = scorer(prompts, [a["rejected"] for a in rows])
    result: dict[str, Any] = {"val_accuracy": pair_accuracy(chosen, rejected)}
    judged = [i for i, a in enumerate(rows) if "score_chosen" in a and a["score_chosen"] != a["score_rejected"]]
    if judged:
        index = torch.tensor(judged)
        # Flip pairs the annotator labelled against its judge, so "chosen" is the judge's favourite.
        agrees = torch.tensor([rows[i]["score_chosen"] > rows[i]["score_rejected"] for i in judged])
        better = torch.where(agrees, chosen[index], rejected[index])
        worse = torch.where(agrees, rejected[index], chosen[index])
        result["val_accuracy_vs_judge"] = pair_accuracy(better, worse)
        result["val_pairs_judged"] = len(judged)
    return result


def _metric(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else None
