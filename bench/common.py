"""Helpers every benchmark process shares (stdlib and torch only, so they import in the peers' venvs too)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads so both sides of a comparison use the same cores."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_peak_flops(size: int = 2048, repeats: int = 5, dtype: str = "fp32") -> float:
    """Best FLOP/s of a ``size``×``size`` torch matmul (``dtype`` ``fp32`` or ``bf16``) on this process's threads
    (2·n³ FLOPs each)."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    a @ b  # warm-up: thread pool and allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def steady_mean(durations: list[float]) -> float:
    """Mean duration after dropping the first (warm-up) one when there are at least two."""
    kept = durations[1:] if len(durations) > 1 else durations
    return statistics.fmean(kept) if kept else float("nan")


def rl_timing(durations: list[float], tokens: list[float], scores: list[float]) -> dict[str, Any]:
    """What every RL side reports from its iterations' wall times, generated tokens and mean rewards (the first
    iteration dropped from the means of time and tokens as warm-up)."""
    seconds = steady_mean(durations)
    return {
        "seconds_per_iteration": seconds,
        "generated_tokens_per_iteration": steady_mean(tokens),
        "seconds_per_1k_tokens": seconds / (steady_mean(tokens) / 1000),
        "iteration_seconds": durations,
        "reward_first": scores[0],
        "reward_last": scores[-1],
        "reward_mean": sum(scores) / len(scores),
    }


def read_config() -> dict[str, Any]:
    """The settings the driver wrote: ``argv[1]`` is a JSON file (``argv[2]`` the result path)."""
    return json.loads(Path(sys.argv[1]).read_text())


def write_result(result: dict[str, Any]) -> None:
    """Add the peak RSS and write the JSON the driver collects to ``argv[2]``."""
    result["peak_rss_mb"] = peak_rss_mb()
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))


def count_params(model: Any) -> tuple[int, int]:
    """(matmul parameters of the decoder trunk, parameters of the LM head) of a causal LM.

    Embedding lookups cost no FLOPs, so the input embedding is left out of the trunk; a tied LM head still costs
    vocab × hidden multiply-adds per position where logits are computed.
    """
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    trunk = total - embedding - (0 if tied else head)
    return trunk, head


def rl_iteration_flops(
    trunk: int,
    head: int,
    rows: int,
    prompt: int,
    response: int,
    epochs: int,
    critic: str,
    reference: bool = True,
    reused_forward: bool = False,
) -> float:
    """Approximate FLOPs of one RL iteration: 2·params per token forward, 6·params forward + backward.

    Counts generation (every position once through the trunk, the head on the new tokens), the rollout forwards of
    policy, reference and critic, and ``epochs`` forward + backward passes of policy and critic, less one forward of
    policy and critic when the first pass reuses the rollout's (``reused_forward``). Attention's quadratic term is
    left out (sequences are short). ``critic`` is ``separate`` (its own trunk), ``shared`` or ``none``.
    """
    length = prompt + response
    trunk_pass = 2.0 * trunk * rows * length  # one forward of the trunk over every position
    head_pass = 2.0 * head * rows * (response + 1)  # logits only at the positions that predict response tokens
    lm_pass = trunk_pass + head_pass
    generation = trunk_pass + 2.0 * head * rows * response
    rollout = lm_pass * (2 if reference else 1) + (trunk_pass if critic == "separate" else 0.0)
    policy_and_critic = lm_pass + (trunk_pass if critic == "separate" else 0.0)
    update = (epochs * 3 - (1 if reused_forward else 0)) * policy_and_critic
    return generation + rollout + update
