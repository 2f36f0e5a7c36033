"""Stage 4: sample the initial policy, every RL snapshot and the final policy on held-out prompts and score them:
gold and proxy reward, KL and perplexity against the reference, diversity, length, win rate and Elo."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lit_rlhf.judges import judge_scores
from lit_rlhf.metrics import DistinctN, WinRate, elo_ratings, sequence_perplexity
from lit_rlhf.pipeline.common import (
    RunPaths,
    finite_or_none,
    generator,
    gold_judge_for,
    prompt_data,
    reward_model,
    write_json,
    write_jsonl,
)
from lit_rlhf.pipeline.config import PipelineConfig
from lit_rlhf.pipeline.rl import list_snapshots, snapshot_iteration
from lit_rlhf.rl import PolicyGenerator
from lit_rlhf.rl.kl import kl_k1

INITIAL = "initial"
ELO_PRIOR_DRAWS = 1.0
"""Virtual draws per player: keeps Elo finite when one checkpoint never loses (BayesElo's prior)."""


def outcomes(scores: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Head-to-head results of matched samples: 1 where ``scores`` is higher, 0.5 on equal scores, 0 where lower.

    Shape: (N,), (N,) -> (N,).
    """
    return 0.5 + 0.5 * torch.sign(scores.double() - baseline.double())


def elo_matches(gold: dict[str, torch.Tensor]) -> list[tuple[str, str, float]]:
    """Every pair of checkpoints meets on every matched sample (same prompt and sample index), judged by gold score."""
    matches = []
    for a, b in itertools.combinations(gold, 2):
        matches += [(a, b, float(o)) for o in outcomes(gold[a], gold[b])]
    return matches


class _Weights:
    """Puts a snapshot's policy weights into the evaluated policy, and the initial ones back."""

    def __init__(self, policy: torch.nn.Module) -> None:
        from peft import PeftModel, get_peft_model_state_dict

        self.policy = policy
        self.lora = isinstance(policy, PeftModel)
        # A fresh LoRA adapter is the identity (B = 0), so its state is the initial policy.
        state = get_peft_model_state_dict(policy) if self.lora else policy.state_dict()
        self.initial = {key: value.detach().clone() for key, value in state.items()}

    def load(self, snapshot: Path | None) -> None:
        from peft import set_peft_model_state_dict

        if self.lora:
            state = self.initial if snapshot is None else _adapter_state(snapshot)
            set_peft_model_state_dict(self.policy, state)
        else:
            state = self.initial if snapshot is None else _full_state(snapshot)
            self.policy.load_state_dict(state)


def _adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _full_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def run_evaluate(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Write ``evaluate/results.json`` (one row per checkpoint, win rate, Elo) and ``evaluate/samples.jsonl``."""
    ec = config.evaluate
    snapshots = list_snapshots(paths.snapshots)
    if not snapshots:
        raise FileNotFoundError(f"{paths.snapshots}: no policy snapshots (iter-NNNN); run the rl stage first.")
    checkpoints: list[tuple[str, int, Path | None]] = [(INITIAL, 0, None)]
    checkpoints += [(f"iter {snapshot_iteration(p)}", snapshot_iteration(p), p) for p in snapshots]
    final = checkpoints[-1][0]

    gold_judge = gold_judge_for(config)
    reward = reward_model(config, paths)
    generation = dataclasses.replace(config.rl.model["generation"], num_samples=ec.samples_per_prompt)
    policy = generator(config, generation, reward, reference=True)
    weights = _Weights(policy.models.policy)
    data = prompt_data(config, "heldout", ec.batch_size, ec.num_prompts)
    loader = data.train_dataloader()

    samples: list[dict[str, Any]] = []
    gold: dict[str, torch.Tensor] = {}
    bar = tqdm(
        total=len(checkpoints) * len(loader),
        desc="evaluate: sample and score",
        unit="batch",
        disable=not config.progress_bar,
    )
    with bar:
        for name, iteration, snapshot in checkpoints:
            weights.load(snapshot)
            torch.manual_seed(config.seed)  # the same random stream for every checkpoint: less noise in comparisons
            rows = []
            for batch in loader:
                rows += _score_batch(policy, batch, gold_judge, name, iteration, ec.samples_per_prompt)
                bar.update(1)
            gold[name] = torch.tensor([r["gold_reward"] for r in rows])
            samples += rows

    by_checkpoint = {name: [s for s in samples if s["checkpoint"] == name] for name, _, _ in checkpoints}
    elo = elo_ratings(elo_matches(gold), prior_draws=ELO_PRIOR_DRAWS, anchor=INITIAL) if len(gold) > 1 else {}
    table = []
    for name, iteration, _ in checkpoints:
        row = summarise(by_checkpoint[name])
        win = WinRate()
        win.update(gold[name], gold[INITIAL])
        row.update(
            checkpoint=name,
            iteration=iteration,
            win_rate_vs_initial=finite_or_none(float(win.compute())),
            elo=round(elo[name]) if name in elo else None,
        )
        table.append(row)
    final_vs_initial = outcomes(gold[final], gold[INITIAL])
    results = {
        "checkpoints": table,
        "final": final,
        "win_rate": float(final_vs_initial.mean()),
        "wins": int((final_vs_initial == 1).sum()),
        "ties": int((final_vs_initial == 0.5).sum()),
        "losses": int((final_vs_initial == 0).sum()),
        "elo": elo,
        "prompts": len(data.datasets["train"]),
        "samples_per_prompt": ec.samples_per_prompt,
        "gold_judge": type(gold_judge).__name__,
    }
    write_json(paths.results, results)
    write_jsonl(paths.eval_samples, samples)
    final_row = table[-1]
    return {
        "win_rate": results["win_rate"],
        "final_kl": final_row["kl"],
        "final_gold_reward": final_row["gold_reward"],
        "initial_gold_reward": table[0]["gold_reward"],
        "checkpoints": len(table),
        "samples_per_checkpoint": len(by_checkpoint[final]),
    }


@torch.no_grad()
def _score_batch(
    policy: PolicyGenerator, batch: dict[str, Any], gold_judge: Any, name: str, iteration: int, samples_per_prompt: int
) -> list[dict[str, Any]]:
    """Sample one batch of prompts (``samples_per_prompt`` each) and measure every sample."""
    rollout = policy.rollout(batch)
    samples = rollout.samples
    mask = samples.response_mask
    # k1 over the response, zero after the stop: log π(y|x) − log π_ref(y|x)
    kl = (kl_k1(rollout.outputs.logprobs, rollout.ref_logprobs) * mask).sum(-1)
    perplexity = sequence_perplexity(rollout.ref_logprobs, mask)
    gold = judge_scores(gold_judge, samples.prompts, samples.completions)
    return [
        {
            "checkpoint": name,
            "iteration": iteration,
            "prompt": samples.prompts[i],
            "sample": i % samples_per_prompt,
            "completion": samples.completions[i],
            "gold_reward": float(gold[i]),
            "proxy_reward": float(rollout.raw_scores[i]),
            "kl": float(kl[i]),
            "ref_perplexity": finite_or_none(float(perplexity[i])),
            "length": int(mask[i].sum()),
        }
        for i in range(len(samples.completions))
    ]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over one checkpoint's samples; perplexity as a median, since one degenerate response can be huge."""
    completions = [r["completion"] for r in rows]
    distinct = {}
    for n in (1, 2):
        metric = DistinctN(n)
        metric.update(completions)
        distinct[f"distinct_{n}"] = float(metric.compute())
    perplexities = [r["ref_perplexity"] for r in rows if r["ref_perplexity"] is not None]
    return {
        "gold_reward": statistics.fmean(r["gold_reward"] for r in rows),
        "proxy_reward": statistics.fmean(r["proxy_reward"] for r in rows),
        "kl": statistics.fmean(r["kl"] for r in rows),
        "ref_perplexity": statistics.median(perplexities) if perplexities else None,
        **distinct,
        "length": statistics.fmean(r["length"] for r in rows),
    }
