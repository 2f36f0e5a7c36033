"""k-fold cross-validation of a reward-model recipe on one preference file: the recipe's pair accuracy on each held-out
fold, its mean ± standard error, and the fit time, so recipes are chosen on more than one small test split.

    python scripts/reward_cv.py --recipe recipes/reward/minilm_hh.yaml \\
        --data ../shared/data/hh-rlhf-harmless-dev.jsonl.gz --folds 5 [-- --model.learning_rate 5e-5 ...]

Rows are grouped by their first human turn (hh-rlhf transcripts) or ``prompt`` field before they are dealt into
folds, so the same conversation never sits on both sides. Each fold fits ``lit-rlhf reward fit --config RECIPE`` on
the other folds (the recipe's own validation split included, callbacks, logger and checkpoints off) and tests the
final weights on its fold. Arguments after ``--`` go to every fit. Results: ``OUTPUT/cv.json`` and ``OUTPUT/cv.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from lit_rlhf.cli import run_stage

QUIET = ["--trainer.callbacks", "null", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]


def read_rows(path: str) -> list[str]:
    """The file's non-empty JSON lines, as they are (each fold file keeps the source format)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def group_key(line: str) -> str:
    """What ties rows to one conversation: the ``prompt`` field, else the chosen transcript's first human turn."""
    row = json.loads(line)
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    return str(row.get("chosen", "")).split("\n\nAssistant:", 1)[0].strip()


def deal_folds(lines: list[str], folds: int, seed: int) -> list[list[str]]:
    """Rows dealt into ``folds`` folds, whole groups at a time, in a seeded random order of the groups."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(group_key(line), []).append(line)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    dealt: list[list[str]] = [[] for _ in range(folds)]
    for key in keys:  # the next group goes to the smallest fold: sizes stay within one group of each other
        min(dealt, key=len).extend(groups[key])
    return dealt


def run_fold(recipe: str, train: Path, test: Path, root: Path, extra: list[str]) -> dict[str, Any]:
    fit_args = ["fit", "--config", recipe, "--data.train_path", str(train), "--trainer.default_root_dir", str(root)]
    start = time.perf_counter()
    fitted = run_stage("reward", [*fit_args, *QUIET, *extra])
    fit_seconds = time.perf_counter() - start
    test_args = ["--config", recipe, "--data.test_path", str(test), *QUIET, *extra]  # run=False: no subcommand
    tester = run_stage("reward", test_args, run=False)
    metrics = tester.trainer.test(fitted.model, datamodule=tester.datamodule, verbose=False)[0]
    pairs = len(tester.datamodule.examples["test"])  # the rows that parsed (pairs with nothing to prefer drop out)
    return {"accuracy": float(metrics["test/accuracy"]), "test_pairs": pairs, "fit_seconds": fit_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/reward/minilm_hh.yaml")
    parser.add_argument("--data", default="../shared/data/hh-rlhf-harmless-dev.jsonl.gz")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="Use only the first this many rows (quick checks).")
    parser.add_argument("--output", default="outputs/reward_cv")
    parser.add_argument("extra", nargs="*", help="After --: arguments for every fit (and test).")
    args = parser.parse_args()
    if args.folds < 2:
        raise SystemExit(f"--folds must be >= 2, got {args.folds}.")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = read_rows(args.data)[: args.limit]
    folds = deal_folds(lines, args.folds, args.seed)
    results = []
    for i, held_out in enumerate(folds):
        fold_dir = out / f"fold-{i}"
        fold_dir.mkdir(exist_ok=True)
        train, test = fold_dir / "train.jsonl", fold_dir / "test.jsonl"
        train.write_text("".join(line for j, fold in enumerate(folds) if j != i for line in fold))
        test.write_text("".join(held_out))
        result = {"fold": i, "rows": len(held_out), **run_fold(args.recipe, train, test, fold_dir, args.extra)}
        results.append(result)
        print(json.dumps(result), flush=True)
    accuracies = [r["accuracy"] for r in results]
    weights = [r["test_pairs"] for r in results]
    pooled = sum(a * w for a, w in zip(accuracies, weights, strict=True)) / sum(weights)
    summary = {
        "recipe": args.recipe,
        "extra": args.extra,
        "data": args.data,
        "folds": results,
        "mean_accuracy": statistics.mean(accuracies),
        "se_across_folds": statistics.stdev(accuracies) / math.sqrt(len(accuracies)),
        "pooled_accuracy": pooled,
        "se_pooled_binomial": math.sqrt(pooled * (1 - pooled) / sum(weights)),
        "mean_fit_seconds": statistics.mean(r["fit_seconds"] for r in results),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / "cv.json").write_text(json.dumps(summary, indent=1))
    lines_md = ["| fold | test pairs | accuracy | fit (s) |", "| ---: | ---: | ---: | ---: |"]
    lines_md += [f"| {r['fold']} | {r['test_pairs']} | {r['accuracy']:.4f} | {r['fit_seconds']:.0f} |" for r in results]
    lines_md.append(
        f"\nmean {summary['mean_accuracy']:.4f} ± {summary['se_across_folds']:.4f} (standard error over folds); "
        f"pooled {pooled:.4f} ± {summary['se_pooled_binomial']:.4f} (binomial); mean fit "
        f"{summary['mean_fit_seconds']:.0f} s; peak RSS {summary['peak_rss_mb']:.0f} MB"
    )
    (out / "cv.md").write_text("\n".join(lines_md) + "\n")
    print("\n".join(lines_md))


if __name__ == "__main__":
    main()
