"""Best-of-n: sample n completions of each prompt from a policy and keep the one a reward scores highest, the
inference-time baseline of RLHF comparisons (Stiennon et al. 2020; Gao et al. 2022; AlpacaFarm, Dubois et al. 2023),
with the analytic KL of that choice to the policy."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit_rlhf.data.rows import Prompt
from lit_rlhf.models import DType
from lit_rlhf.rl.decoding import GenerationOptions
from lit_rlhf.rl.experience import Samples
from lit_rlhf.rl.generation import PolicyGenerator
from lit_rlhf.rl.scoring import RewardFn, score


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π) = log n − (n − 1) / n, in nats: the KL of best-of-n to the policy it samples from, as Stiennon
    et al. (2020) and Gao et al. (2022) compute it, so that best-of-n sits on the same KL axis as RL policies.

    The formula assumes the n candidates are distinct; when they can repeat (short answers, low temperature) it is an
    upper bound on the true KL (Beirami et al. 2024).
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}.")
    return math.log(n) - (n - 1) / n


def best_indices(scores: Tensor, n: int) -> Tensor:
    """Index of the highest score within each group of ``n`` adjacent candidates (the first one on ties).

    Shape: (B·n,) -> (B,) long, each in [0, n).
    """
    if scores.dim() != 1 or scores.numel() % n:
        raise ValueError(f"best_indices: {tuple(scores.shape)} scores do not split into groups of n = {n}.")
    return scores.view(-1, n).argmax(-1)


@dataclass
class BestOfN:
    """One prompt's best-of-n: the kept completion and every candidate with its score."""

    prompt: str
    """The prompt text, as the reward saw it."""
    completion: str
    """The candidate the reward scored highest (the first of equal best scores)."""
    score: float
    """Its score."""
    candidates: list[str]
    """All n candidates, in the order they were sampled."""
    scores: list[float]
    """The reward's score of each candidate."""

    @property
    def n(self) -> int:
        return len(self.candidates)

    @property
    def kl(self) -> float:
        """The analytic KL of best-of-n to the policy (``best_of_n_kl``)."""
        return best_of_n_kl(self.n)

    def row(self) -> dict[str, Any]:
        """As a JSON line: prompt, completion, score, n, kl and the candidates as ``{completion, score}``."""
        candidates = [{"completion": c, "score": s} for c, s in zip(self.candidates, self.scores, strict=True)]
        return {
            "prompt": self.prompt,
            "completion": self.completion,
            "score": self.score,
            "n": self.n,
            "kl": self.kl,
            "candidates": candidates,
        }


@torch.no_grad()
def sample_best_of_n(
    generator: PolicyGenerator,
    prompts: Sequence[str],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    n: int,
    reward: RewardFn | None = None,
    options: GenerationOptions | None = None,
) -> tuple[Samples, Tensor, Tensor]:
    """Sample ``n`` candidates per prompt (``options``, else the generator's, with ``num_samples = n``) and score
    them with ``reward`` (else the generator's).

    Shape: prompt_ids, prompt_mask (b, P) -> the candidates' Samples (b·n rows, each prompt's n adjacent), their
    scores (b·n,) and the row of each prompt's best candidate (b,) long.
    """
    reward = reward if reward is not None else generator.reward
    if reward is None:
        raise ValueError("best-of-n needs a reward: pass one, or give the PolicyGenerator one.")
    best_of_n_kl(n)  # checks n
    options = dataclasses.replace(options or generator.options, num_samples=n)
    samples = generator.samples(prompts, prompt_ids, prompt_mask, options)
    scores = score(reward, samples.prompts, samples.completions)
    rows = best_indices(scores, n) + torch.arange(0, scores.numel(), n, device=scores.device)
    return samples, scores, rows


def best_of_n(
    generator: PolicyGenerator,
    prompts: Sequence[str | Prompt],
    n: int,
    reward: RewardFn | None = None,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    seed: int | None = None,
    progress_bar: bool = True,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_length: int = 256,
) -> list[BestOfN]:
    """Best-of-n of ``generator``'s policy on raw prompts: n completions each, the highest-scoring one kept.

    Args:
        generator: The policy to sample (e.g. ``PolicyGenerator.load(path, options, reference=False)``).
        prompts: Prompt texts, or ``Prompt`` rows (``lit_rlhf.data.prompts.read_prompts``) whose messages are rendered.
        n: Candidates per prompt.
        reward: Scores completions, ``(prompts, completions) -> (N,)``; None: the generator's.
        options: How to sample; None: the generator's. ``num_samples`` is replaced by ``n``.
        batch_size: Prompts per generation batch (each gives ``n`` rows).
        seed: Seed of the sampling, drawn from a forked random stream (the caller's stream is left as it was); None
            draws from the current stream.
        progress_bar: Show a progress bar over the batches (when there is more than one).
        chat_template: Render each prompt with the policy's chat template, as ``PromptDataModule`` does.
        system_prompt: System message put before every prompt.
        max_prompt_length: Longest prompt in tokens; longer prompts lose their beginning.

    Returns:
        One ``BestOfN`` per prompt, in order.
    """
    if batch_size < 1:
        raise ValueError(f"best_of_n: batch_size must be >= 1, got {batch_size}.")
    starts = range(0, len(prompts), batch_size)
    results: list[BestOfN] = []
    devices = [generator.device] if generator.device.type == "cuda" else []
    with torch.random.fork_rng(devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in tqdm(starts, desc=f"best-of-{n}", unit="batch", disable=not progress_bar or len(starts) < 2):
            chunk = prompts[start : start + batch_size]
            texts = [p.text if isinstance(p, Prompt) else p for p in chunk]
            prompt_ids, prompt_mask = generator.encode(chunk, chat_template, system_prompt, max_prompt_length)
            samples, scores, rows = sample_best_of_n(generator, texts, prompt_ids, prompt_mask, n, reward, options)
            values = scores.tolist()
            for i, row in enumerate(rows.tolist()):
                group = slice(i * n, (i + 1) * n)
                results.append(
                    BestOfN(texts[i], samples.completions[row], values[row], samples.completions[group], values[group])
                )
    return results


def run_best_of_n(
    policy: str,
    reward: RewardFn,
    output: str,
    prompts: str | None = None,
    n: int = 8,
    generation: GenerationOptions = GenerationOptions(),
    batch_size: int = 8,
    seed: int = 0,
    split: str = "heldout",
    limit: int | None = None,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_length: int = 256,
    dtype: DType = "float32",
    device: str | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Best-of-n of a policy on a prompt file: write one JSON line per prompt (prompt, completion, score, n, kl and
    the n candidates with their scores) and return a summary.

    Args:
        policy: The policy: bundled name, hub id or path (e.g. an exported ``rl/hf/final``, or the initial model).
        reward: Scores completions: any callable ``(prompts, completions) -> Tensor | list[float]``; in YAML or on the
            command line a ``class_path`` (``lit_rlhf.reward.RewardModel`` with its ``path``,
            ``lit_rlhf.rewards.SentimentReward`` ...) or the dotted import path of a function.
        output: The JSON-lines file to write (its folder is created).
        prompts: A ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file with a ``prompt`` or ``messages`` field, a
            dataset folder or a hub name; None: the packaged prompt set's ``split``.
        n: Candidates sampled per prompt.
        generation: How candidates are sampled (``num_samples`` is replaced by ``n``).
        batch_size: Prompts per generation batch (each gives ``n`` rows).
        seed: Seed of the sampling: the same seed gives the same file.
        split: The split of a dataset folder or hub name, or of the packaged set (``train`` or ``heldout``).
        limit: Use only the first this many prompts.
        chat_template: Render each prompt with the policy's chat template, as the RL stage does.
        system_prompt: System message put before every prompt.
        max_prompt_length: Longest prompt in tokens; longer prompts lose their beginning.
        dtype: Weight dtype of the policy.
        device: Where the policy runs (``cpu``, ``cuda``, ``cuda:1`` ...); None: the first GPU if there is one.
        progress_bar: Show a progress bar.
    """
    from lit_rlhf.data.prompts import read_prompts

    rows = read_prompts(prompts, split, limit)
    if not rows:
        raise ValueError(f"{prompts or f'the packaged {split} prompts'}: no prompts to sample.")
    generator = PolicyGenerator.load(policy, generation, reward, dtype=dtype, reference=False)
    generator.models.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = best_of_n(
        generator,
        rows,
        n,
        batch_size=batch_size,
        seed=seed,
        progress_bar=progress_bar,
        chat_template=chat_template,
        system_prompt=system_prompt,
        max_prompt_length=max_prompt_length,
    )
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(result.row(), ensure_ascii=False) + "\n" for result in results)
    return {
        "output": str(path),
        "prompts": len(results),
        "n": n,
        "kl": best_of_n_kl(n),
        "mean_best_score": statistics.fmean(r.score for r in results),
        "mean_candidate_score": statistics.fmean(s for r in results for s in r.scores),
    }
