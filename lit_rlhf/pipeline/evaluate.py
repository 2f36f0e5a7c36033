"""Stage 4: sample the initial policy, every RL snapshot and the final policy on held-out prompts and score them:
gold and proxy reward, KL and perplexity against the reference, diversity, length, win rate and Elo; optionally
best-of-n of the initial policy against the reward model as baselines, measured the same way."""

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
from lit_rlhf.rl import PolicyGenerator, Samples
from lit_rlhf.rl.best_of_n import best_of_n_kl, sample_best_of_n
from lit_rlhf.rl.kl import kl_k1
from lit_rlhf.rl.scoring import RewardFn

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


def best_of_n_name(n: int) -> str:
    """How results, samples and the report name the best-of-n baseline."""
    return f"best-of-{n}"


def run_evaluate(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Write ``evaluate/results.json`` (one row per checkpoint, and per best-of-n baseline under ``best_of_n``; win
    rate, Elo) and ``evaluate/samples.jsonl``."""
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
        total=(len(checkpoints) + len(ec.best_of_n)) * len(loader),
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
        weights.load(None)  # best-of-n samples the initial policy
        candidates = ec.batch_size * ec.samples_per_prompt  # rows per generation: as many as a checkpoint's batch
        for n in ec.best_of_n:
            torch.manual_seed(config.seed)
            rows = []
            for batch in loader:
                rows += _score_best_of_n(policy, batch, reward, gold_judge, n, ec.samples_per_prompt, candidates)
                bar.update(1)
            gold[best_of_n_name(n)] = torch.tensor([r["gold_reward"] for r in rows])
            samples += rows

    by_checkpoint: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_checkpoint.setdefault(sample["checkpoint"], []).append(sample)
    elo = elo_ratings(elo_matches(gold), prior_draws=ELO_PRIOR_DRAWS, anchor=INITIAL) if len(gold) > 1 else {}

    def summary_row(name: str, iteration: int) -> dict[str, Any]:
        win = WinRate()
        win.update(gold[name], gold[INITIAL])
        return {
            **summarise(by_checkpoint[name]),
            "checkpoint": name,
            "iteration": iteration,
            "win_rate_vs_initial": finite_or_none(float(win.compute())),
            "elo": round(elo[name]) if name in elo else None,
        }

    table = [summary_row(name, iteration) for name, iteration, _ in checkpoints]
    best_of_n = [{**summary_row(best_of_n_name(n), 0), "n": n} for n in ec.best_of_n]
    final_vs_initial = outcomes(gold[final], gold[INITIAL])
    results = {
        "checkpoints": table,
        "best_of_n": best_of_n,
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
        "best_of_n_gold_reward": {row["checkpoint"]: row["gold_reward"] for row in best_of_n},
    }


@torch.no_grad()
def _score_batch(
    policy: PolicyGenerator, batch: dict[str, Any], gold_judge: Any, name: str, iteration: int, samples_per_prompt: int
) -> list[dict[str, Any]]:
    """Sample one batch of prompts (``samples_per_prompt`` each) and measure every sample."""
    rollout = policy.rollout(batch)
    mask = rollout.samples.response_mask
    # k1 over the response, zero after the stop: log π(y|x) − log π_ref(y|x)
    kl = (kl_k1(rollout.outputs.logprobs, rollout.ref_logprobs) * mask).sum(-1)
    measured = _measure(rollout.samples, rollout.raw_scores, kl, rollout.ref_logprobs, gold_judge)
    return [
        {"checkpoint": name, "iteration": iteration, "sample": i % samples_per_prompt, **row}
        for i, row in enumerate(measured)
    ]


@torch.no_grad()
def _score_best_of_n(
    policy: PolicyGenerator,
    batch: dict[str, Any],
    reward: RewardFn,
    gold_judge: Any,
    n: int,
    samples_per_prompt: int,
    rows_per_generation: int,
) -> list[dict[str, Any]]:
    """``samples_per_prompt`` best-of-n samples per prompt of one batch, each the best of ``n`` fresh candidates by
    ``reward``, measured as ``_score_batch`` measures a sample; their KL is the analytic ``best_of_n_kl(n)``.
    Candidates are sampled about ``rows_per_generation`` at a time, not n times as many rows as a checkpoint's."""
    k = samples_per_prompt
    prompts = [p for p in batch["prompt"] for _ in range(k)]
    prompt_ids, prompt_mask = (
        batch["input_ids"].repeat_interleave(k, 0),
        batch["attention_mask"].repeat_interleave(k, 0),
    )
    step = max(1, rows_per_generation // n)
    temperature, banned = policy.options.logprob_temperature, policy.banned()
    measured = []
    for start in range(0, len(prompts), step):
        part = slice(start, start + step)
        samples, scores, best = sample_best_of_n(policy, prompts[part], prompt_ids[part], prompt_mask[part], n, reward)
        kept = samples.select(best)
        length = kept.prompt_ids.shape[1]
        ref_logprobs = policy.models.reference_logprobs(
            kept.sequences, kept.attention_mask, length, temperature, banned
        )
        kl = torch.full((len(kept.completions),), best_of_n_kl(n))
        measured += _measure(kept, scores[best], kl, ref_logprobs, gold_judge)
    name = best_of_n_name(n)
    return [{"checkpoint": name, "iteration": 0, "sample": i % k, **row} for i, row in enumerate(measured)]


def _measure(
    samples: Samples, proxy: torch.Tensor, kl: torch.Tensor, ref_logprobs: torch.Tensor, gold_judge: Any
) -> list[dict[str, Any]]:
    """What evaluation records of each sample: its texts, gold and proxy reward, KL, perplexity under the reference
    and length in tokens.

    Shape: proxy (B,), kl (B,), ref_logprobs (B, T) -> B rows.
    """
    mask = samples.response_mask
    gold = judge_scores(gold_judge, samples.prompts, samples.completions)
    perplexity = sequence_perplexity(ref_logprobs, mask)
    return [
        {
            "prompt": samples.prompts[i],
            "completion": samples.completions[i],
            "gold_reward": float(gold[i]),
            "proxy_reward": float(proxy[i]),
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
