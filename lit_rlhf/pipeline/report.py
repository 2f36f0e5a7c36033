"""Stage 5: ``report.md`` for a person to read: what each stage did, curves, the checkpoint table, sample responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lit_rlhf.pipeline.common import RunPaths, read_json
from lit_rlhf.pipeline.config import PipelineConfig
from lit_rlhf.reporting import Section, plot_curves, plot_gold_vs_proxy, read_jsonl, sample_rows, write_report

CURVES = {
    "objective/score": "proxy reward (RM)",
    "objective/kl": "KL to reference (nats)",
    "objective/kl_coef": "KL coefficient β",
    "response/length": "length (tokens)",
}
CHECKPOINT_COLUMNS = {
    "checkpoint": "checkpoint",
    "gold_reward": "gold reward",
    "proxy_reward": "proxy reward",
    "kl": "KL (nats)",
    "ref_perplexity": "ref. perplexity",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "length": "length",
    "win_rate_vs_initial": "win rate vs initial",
    "elo": "Elo",
}


def quantity_rows(items: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a two-column "quantity | value" table; items whose value is None are left out."""
    return [{"quantity": name, "value": value} for name, value in items if value is not None]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def run_report(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Write ``report.md`` and ``plots/*.png`` from the other stages' outputs."""
    stages = {stage: read_json(paths.marker(stage)) for stage in ("collect", "reward", "rl", "evaluate")}
    collect, reward, rl = (stages[s]["summary"] for s in ("collect", "reward", "rl"))
    results = read_json(paths.results)
    table = results["checkpoints"]
    initial, final = table[0], table[-1]
    best_of_n = results.get("best_of_n", [])

    history = [row for row in read_jsonl(paths.rl_metrics) if row.get("stage", "train") == "train"]
    curves = plot_curves(
        history,
        [key for key in CURVES if any(key in row for row in history)] or ["objective/score"],
        paths.plots / "rl_curves.png",
        x_key="iteration",
        title="RL training, per iteration",
        labels=CURVES,
    )
    gold_vs_proxy = plot_gold_vs_proxy(
        table,
        paths.plots / "gold_vs_proxy.png",
        x="kl",
        title="Gold vs proxy reward per checkpoint (held-out prompts)",
        baselines=best_of_n,
        baseline_label="best-of-n",
    )
    samples = read_jsonl(paths.eval_samples)
    before = [s for s in samples if s["checkpoint"] == initial["checkpoint"] and s["sample"] == 0]
    after = [s for s in samples if s["checkpoint"] == final["checkpoint"] and s["sample"] == 0]
    shown = min(config.report.num_samples, len(before), len(after))
    pairs = read_jsonl(paths.annotations)[:3]
    total_seconds = sum(stages[s].get("seconds", 0.0) for s in stages)

    sections = [
        Section(
            "Summary",
            text=(
                f"The final policy ({final['checkpoint']}) against the initial one on {results['prompts']} held-out "
                f"prompts × {results['samples_per_prompt']} samples, judged by the gold judge "
                f"({results['gold_judge']}): {results['wins']} wins, {results['ties']} ties, {results['losses']} "
                "losses."
            ),
            rows=quantity_rows(
                [
                    ("gold-judge win rate, final vs initial (ties count ½)", results["win_rate"]),
                    ("mean KL of the final policy to the reference (nats per response)", final["kl"]),
                    ("gold reward, initial → final", f"{_fmt(initial['gold_reward'])} → {_fmt(final['gold_reward'])}"),
                    (
                        "proxy (reward model) reward, initial → final",
                        f"{_fmt(initial['proxy_reward'])} → {_fmt(final['proxy_reward'])}",
                    ),
                    ("reward model: held-out pair accuracy vs annotator labels", reward.get("val_accuracy")),
                    (
                        "reward model: held-out pair accuracy vs the judge's ordering",
                        reward.get("val_accuracy_vs_judge"),
                    ),
                    ("wall time of collect + reward + rl + evaluate (s)", round(total_seconds)),
                ]
            ),
        ),
        Section(
            "1. Preference collection",
            text=(
                f"{collect['samples_per_prompt']} completions of `{config.policy}` per training prompt; every pair "
                f"labelled by `{collect['annotator']}`. Pairs of {collect['val_prompts']} held-out prompts are kept "
                "apart to measure the reward model. Files: `collect/train.jsonl`, `collect/val.jsonl` "
                "(`PreferenceDataModule` format), `collect/annotations.jsonl` (with judge scores)."
            ),
            rows=quantity_rows(
                [
                    ("prompts", collect["prompts"]),
                    ("completions", collect["completions"]),
                    ("pairs labelled", collect["pairs_labelled"]),
                    ("pairs with identical completions (skipped)", collect["identical_pairs"]),
                    ("ties" + (" (dropped)" if collect["ties_dropped"] else ""), collect["ties"]),
                    ("training pairs", collect["train_pairs"]),
                    ("held-out pairs", collect["val_pairs"]),
                    ("labels that agree with the judge's ordering", collect.get("label_agreement_with_judge")),
                    ("mean judge score of the sampled completions", collect.get("mean_judge_score")),
                ]
            ),
        ),
        Section(
            "Example labelled pairs",
            rows=pairs,
            columns={"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "probability": "P(label)"},
            max_chars=config.report.max_chars,
        ),
        Section(
            "2. Reward model",
            text=(
                f"`RewardModelModule` on `{reward['backbone']}`, Bradley–Terry loss, exported to `reward/model` "
                "(load it with `lit_rlhf.reward.RewardModel`)."
            ),
            rows=quantity_rows(
                [
                    ("training pairs", reward["train_pairs"]),
                    ("epochs", reward["epochs"]),
                    ("optimizer steps", reward["optimizer_steps"]),
                    ("final training loss", reward.get("final_train_loss")),
                    ("held-out pairs", reward["val_pairs"]),
                    ("held-out accuracy vs annotator labels", reward.get("val_accuracy")),
                    ("held-out accuracy vs the judge's ordering", reward.get("val_accuracy_vs_judge")),
                ]
            ),
        ),
        Section(
            "3. RL training",
            text=(
                f"{rl['algorithm']} against the reward model with a KL penalty to the initial policy: "
                f"{rl['iterations']} iterations of {rl['prompts_per_iteration']} prompts ({rl['optimizer_steps']} "
                f"optimizer steps); final KL coefficient β = {_fmt(rl['final_kl_coef'], '.4f')}. Per-iteration "
                "metrics: `rl/metrics.jsonl`; samples during training: `rl/samples.md`."
            ),
            images=[curves],
        ),
        Section(
            "4. Evaluation on held-out prompts",
            text=(
                "Each checkpoint samples the held-out prompts with the same random stream. Gold reward: the gold "
                "judge; proxy reward: the learned reward model; KL: Σ over response tokens of log π − log π_ref on "
                "the sampled responses; ref. perplexity: median per-response perplexity under the initial policy; "
                "distinct-n over whitespace tokens; length in policy tokens; win rate and Elo (anchored at "
                "initial = 1000, Bradley–Terry fit with one virtual draw each) from head-to-head gold-judge "
                "comparisons of matched samples. When the proxy keeps rising while the gold reward stalls or falls "
                "as KL grows, the policy is over-optimising the reward model (Gao et al., 2022)."
                + (
                    " Best-of-n rows: each sample is the one of n samples of the initial policy that the reward model "
                    "scores highest (no training), judged the same way; their KL is the analytic log n − (n − 1)/n "
                    "(Stiennon et al., 2020), an upper bound when samples repeat. They are the inference-time "
                    "baseline, dotted in the plot."
                    if best_of_n
                    else ""
                )
            ),
            rows=table + best_of_n,
            columns=CHECKPOINT_COLUMNS,
            images=[gold_vs_proxy],
        ),
        Section(
            "5. Before and after",
            text=f"The first sample of the initial and the final policy on {shown} held-out prompts, with gold scores.",
            rows=sample_rows(
                [s["prompt"] for s in before[:shown]],
                [s["completion"] for s in before[:shown]],
                [s["completion"] for s in after[:shown]],
                [s["gold_reward"] for s in before[:shown]],
                [s["gold_reward"] for s in after[:shown]],
            ),
            columns={
                "prompt": "prompt",
                "before": "initial policy",
                "before_score": "gold",
                "after": "final policy",
                "after_score": "gold",
            },
            max_chars=config.report.max_chars,
        ),
        Section(
            "Stage timings",
            text="Wall time of each stage's last run (a stage whose outputs were up to date was skipped).",
            rows=[
                {"stage": stage, "seconds": f"{marker.get('seconds', 0.0):.1f}", "finished": marker.get("finished")}
                for stage, marker in stages.items()
            ],
        ),
    ]
    write_report(
        paths.report.parent,
        sections,
        title=f"RLHF pipeline report: {config.name}",
        intro=(
            f"Policy `{config.policy}`, reward model on `{config.reward.model['backbone']}`, annotator "
            f"`{collect['annotator']}`. Stages: collect preferences → reward model → RL → evaluate. "
            f"Configuration: `config.yaml`; `lit-rlhf pipeline --config {paths.root / 'config.yaml'}` reruns whatever "
            "is out of date."
        ),
        filename=paths.report.name,
    )
    final = RunPaths(paths.root)  # where the files are once the stage is done
    return {"report": str(final.report), "plots": [str(final.plots / p.name) for p in (curves, gold_vs_proxy)]}
