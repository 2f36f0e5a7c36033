"""The offline stages on the demo task: DPO and ILQL trained on the demo's collected preference pairs, measured as
the pipeline's evaluate stage measures a policy (gold win rate against the initial policy, KL, gold and proxy reward)
beside the demo's PPO result (docs/offline.md).

    python scripts/measure_offline.py --source outputs/demo                 # reuse a finished demo run
    python scripts/measure_offline.py --source outputs/demo --dpo-epochs 2 --dpo-beta 0.05
    python scripts/measure_offline.py --config recipes/pipeline/tiny.yaml --source /tmp/tiny --output_dir /tmp/off

``--source`` must hold a finished run of ``--config`` (collect, reward, rl and evaluate stages). DPO trains with the
RL stage's LoRA adapter and ``trainable_layers`` on the source's ``collect/train.jsonl`` pairs (prompts rendered with
the policy's chat template, as the pipeline samples them), its reference log-probs computed once. Its adapter is
saved as the single RL snapshot of a copy of the run (``OUTPUT_DIR/dpo``), whose evaluate stage then runs, forced.
ILQL trains its Q and V heads and the same LoRA adapter on the same collected responses, each scored by the source
run's reward model (standardised; ``--ilql-rewards pairs`` reads the pairs as +1 / −1 rows instead); it is then
sampled through the pipeline's generator with its decoding hooks (``ILQLDecoding``) at each ``--ilql-betas`` value,
on the evaluate stage's held-out prompts, with the same seeds, and judged the same way: win rate against the initial
policy's samples (drawn again here), KL of the ILQL distribution to the initial policy.
Results: ``OUTPUT_DIR/offline.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pipeline_config(argv: list[str]):
    """The pipeline's typed configuration, parsed as ``lit-rlhf pipeline`` parses it."""
    from lit_rlhf.pipeline.config import from_namespace
    from lit_rlhf.pipeline.runner import build_parser

    parser = build_parser()
    return from_namespace(parser.instantiate_classes(parser.parse_args(argv)))


def copy_run(source: Path, target: Path) -> None:
    """Give ``target`` the collect and reward outputs of ``source`` and stage markers up to rl, with no snapshots."""
    for stage in ("collect", "reward"):
        shutil.rmtree(target / stage, ignore_errors=True)
        shutil.copytree(source / stage, target / stage)
    (target / "stages").mkdir(parents=True, exist_ok=True)
    for stage in ("collect", "reward", "rl"):
        marker = source / "stages" / f"{stage}.json"
        if not marker.exists():
            raise SystemExit(f"{source} has no finished {stage} stage ({marker} is missing); run the pipeline first.")
        shutil.copy2(marker, target / "stages" / marker.name)
    shutil.rmtree(target / "rl", ignore_errors=True)
    (target / "rl" / "checkpoints").mkdir(parents=True)


def collected_pairs(source: Path, split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The source run's collected pairs of ``split`` (``collect/{split}.jsonl``); with ``limit``, that many of them
    drawn at random (seeded), in file order."""
    import random

    pairs = [json.loads(line) for line in (source / "collect" / f"{split}.jsonl").read_text().splitlines() if line]
    if limit is not None and limit < len(pairs):
        kept = set(random.Random(seed).sample(range(len(pairs)), limit))
        pairs = [pair for i, pair in enumerate(pairs) if i in kept]
    return pairs


def chat_rows(pairs: list[dict[str, Any]], target: Path, chat_template: bool) -> str:
    """The pairs with each prompt as a user message (rendered by the chat template when the pipeline renders prompts
    with it), so the offline methods train on the texts the policy is sampled from."""
    shown = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} if chat_template else row for row in pairs]
    target.write_text("".join(json.dumps(row) + "\n" for row in shown))
    return str(target)


def fit(config, module, data, run_dir: Path, name: str, epochs: int) -> dict[str, Any]:
    """``epochs`` of ``module`` on ``data`` at the pipeline's precision, logged to ``run_dir/name``: wall time, steps
    and the last validation metrics."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        precision=config.precision,
        logger=L.pytorch.loggers.CSVLogger(run_dir, name=name),
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"train_seconds": seconds, "steps": trainer.global_step, "pairs": len(data.examples["train"]), **metrics}


def train_dpo(config, source: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fit ``DPOModule`` on the source's pairs and save its adapter as the run's only snapshot, ``iter-0001``."""
    import lightning as L

    from lit_rlhf.data.preferences import PreferenceDataModule
    from lit_rlhf.dpo import DPOModule

    L.seed_everything(config.seed)
    model = config.rl.model
    module = DPOModule(
        config.policy,
        lora=model.get("lora"),
        trainable_layers=model.get("trainable_layers"),
        loss=args.dpo_loss,
        beta=args.dpo_beta,
        precompute_reference=True,
        learning_rate=args.dpo_lr,
        scheduler="linear",
        warmup_ratio=0.1,
        dtype=model.get("dtype", "float32"),
    )
    data = PreferenceDataModule(
        config.policy,
        train_path=chat_rows(train_pairs(source, args, config), run_dir / "dpo_train.jsonl", config.chat_template),
        val_path=chat_rows(collected_pairs(source, "val"), run_dir / "dpo_val.jsonl", config.chat_template),
        max_length=args.dpo_max_length,
        batch_size=args.dpo_batch_size,
        encoding="causal_lm",
        seed=config.seed,
    )
    trained = fit(config, module, data, run_dir, "dpo_logs", args.dpo_epochs)
    module.model.save_pretrained(run_dir / "rl" / "checkpoints" / "iter-0001")
    return trained


def train_pairs(source: Path, args: argparse.Namespace, config) -> list[dict[str, Any]]:
    """The training pairs both methods learn from: ``--max-pairs`` of the collected ones, or all."""
    return collected_pairs(source, "train", args.max_pairs, config.seed)


def reward_scored_rows(config, source: Path, pairs: list[dict[str, Any]], target: Path) -> str:
    """Every distinct response of the source's collected pairs, scored by the source run's reward model and
    standardised (mean 0, standard deviation 1 over the file), as ``prompt`` (a user message) / ``response`` /
    ``reward`` rows: "the pipeline's collected samples scored by the reward model"."""
    import statistics

    from lit_rlhf.pipeline.common import RunPaths, reward_model

    responses = list(dict.fromkeys((row["prompt"], row[side]) for row in pairs for side in ("chosen", "rejected")))
    scores = reward_model(config, RunPaths(source))([p for p, _ in responses], [r for _, r in responses]).tolist()
    mean, spread = statistics.fmean(scores), statistics.pstdev(scores) or 1.0
    with target.open("w") as handle:
        for (prompt, response), score in zip(responses, scores, strict=True):
            shown = [{"role": "user", "content": prompt}] if config.chat_template else prompt
            handle.write(json.dumps({"prompt": shown, "response": response, "reward": (score - mean) / spread}) + "\n")
    return str(target)


def train_ilql(config, source: Path, run_dir: Path, args: argparse.Namespace):
    """Fit ``ILQLModule`` (LoRA on the RL stage's layers, the heads in full) on the source's pairs as ±1 rows."""
    import lightning as L

    from lit_rlhf.data.scored import ScoredDataModule
    from lit_rlhf.ilql import ILQLModule

    L.seed_everything(config.seed)
    model = config.rl.model
    module = ILQLModule(
        config.policy,
        lora=model.get("lora"),
        trainable_layers=model.get("trainable_layers"),
        learning_rate=args.ilql_lr,
        alpha=args.ilql_alpha,
        target_sync_every=1,
        scheduler="linear",
        warmup_ratio=0.1,
        dtype=model.get("dtype", "float32"),
    )
    if args.ilql_rewards == "reward_model":
        train = reward_scored_rows(config, source, train_pairs(source, args, config), run_dir / "ilql_train.jsonl")
        val = reward_scored_rows(config, source, collected_pairs(source, "val"), run_dir / "ilql_val.jsonl")
    else:  # the pairs, each read as a +1 and a -1 row
        train = chat_rows(train_pairs(source, args, config), run_dir / "ilql_train.jsonl", config.chat_template)
        val = chat_rows(collected_pairs(source, "val"), run_dir / "ilql_val.jsonl", config.chat_template)
    data = ScoredDataModule(
        config.policy,
        train_path=train,
        val_path=val,
        max_length=args.dpo_max_length,
        batch_size=args.dpo_batch_size,
        seed=config.seed,
    )
    trained = fit(config, module, data, run_dir, "ilql_logs", args.ilql_epochs)
    return module.eval(), trained


def evaluate_ilql(config, source: Path, module, betas: list[float]) -> dict[str, dict[str, Any]]:
    """ILQL decoding at each β on the evaluate stage's held-out prompts, measured as the evaluate stage measures a
    checkpoint (``_measure``, ``summarise``), with the initial policy sampled again under the same seed."""
    import dataclasses

    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lit_rlhf.ilql_decoding import ILQLDecoding
    from lit_rlhf.pipeline.common import RunPaths, generator, gold_judge_for, prompt_data, reward_model
    from lit_rlhf.pipeline.evaluate import _measure, outcomes, summarise
    from lit_rlhf.rl.kl import kl_k1

    ec = config.evaluate
    generation = dataclasses.replace(config.rl.model["generation"], num_samples=ec.samples_per_prompt)
    policy = generator(config, generation, reward_model(config, RunPaths(source)), reference=True)
    gold_judge = gold_judge_for(config)
    loader = prompt_data(config, "heldout", ec.batch_size, ec.num_prompts).train_dataloader()
    initial_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(policy.models.policy).items()}
    heads = module.decoding_heads()

    def measure(decoding: ILQLDecoding | None) -> list[dict[str, Any]]:
        torch.manual_seed(config.seed)  # as the evaluate stage seeds every checkpoint
        rows = []
        for batch in loader:
            rollout = policy.rollout(batch, decoding)
            mask = rollout.samples.response_mask
            kl = (kl_k1(rollout.outputs.logprobs, rollout.ref_logprobs) * mask).sum(-1)
            rows += _measure(rollout.samples, rollout.raw_scores, kl, rollout.ref_logprobs, gold_judge)
        return rows

    set_peft_model_state_dict(policy.models.policy, initial_adapter)
    initial = measure(None)
    initial_gold = torch.tensor([r["gold_reward"] for r in initial])
    set_peft_model_state_dict(policy.models.policy, get_peft_model_state_dict(module.model))
    results = {}
    for beta in betas:
        rows = measure(ILQLDecoding(heads, beta))
        versus = outcomes(torch.tensor([r["gold_reward"] for r in rows]), initial_gold)
        summary = summarise(rows)
        results[f"ILQL (β {beta:g})"] = {
            "win_rate": float(versus.mean()),
            "wins_ties_losses": [int((versus == 1).sum()), int((versus == 0.5).sum()), int((versus == 0).sum())],
            "kl": summary["kl"],
            "gold_reward": summary["gold_reward"],
            "proxy_reward": summary["proxy_reward"],
            "initial_gold_reward": float(initial_gold.mean()),
            "ref_perplexity": summary["ref_perplexity"],
            "distinct_2": summary["distinct_2"],
        }
    return results


def evaluate(run_dir: Path, pipeline_args: list[str]) -> dict[str, Any]:
    """The pipeline's evaluate stage on ``run_dir`` (forced), and its final-vs-initial numbers."""
    from lit_rlhf.pipeline import main

    main([*pipeline_args, "--output_dir", str(run_dir), "--stages", "evaluate", "--force"])
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    final, initial = results["checkpoints"][-1], results["checkpoints"][0]
    return {
        "win_rate": results["win_rate"],
        "wins_ties_losses": [results["wins"], results["ties"], results["losses"]],
        "kl": final["kl"],
        "gold_reward": final["gold_reward"],
        "proxy_reward": final["proxy_reward"],
        "initial_gold_reward": initial["gold_reward"],
        "ref_perplexity": final["ref_perplexity"],
        "distinct_2": final["distinct_2"],
    }


def source_row(source: Path) -> dict[str, Any]:
    """The source run's own RL result (its evaluate stage), for comparison."""
    results = json.loads((source / "evaluate" / "results.json").read_text())
    final = results["checkpoints"][-1]
    rl = json.loads((source / "stages" / "rl.json").read_text())
    return {
        "win_rate": results["win_rate"],
        "wins_ties_losses": [results["wins"], results["ties"], results["losses"]],
        "kl": final["kl"],
        "gold_reward": final["gold_reward"],
        "proxy_reward": final["proxy_reward"],
        "initial_gold_reward": results["checkpoints"][0]["gold_reward"],
        "ref_perplexity": final["ref_perplexity"],
        "distinct_2": final["distinct_2"],
        "train_seconds": rl["seconds"],
    }


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | gold win rate vs initial (W/T/L) | KL (nats) | gold reward (initial) | proxy reward | train (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        wtl = "/".join(str(x) for x in r["wins_ties_losses"])
        lines.append(
            f"| {name} | {r['win_rate']:.3f} ({wtl}) | {r['kl']:.2f} | {r['gold_reward']:.3f} "
            f"({r['initial_gold_reward']:.3f}) | {r['proxy_reward']:.3f} | {r.get('train_seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "pipeline" / "demo.yaml"))
    parser.add_argument("--source", default="outputs/demo", help="a finished run of --config")
    parser.add_argument("--output_dir", default="outputs/offline")
    parser.add_argument("--dpo-loss", default="sigmoid")
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--dpo-epochs", type=int, default=1)
    parser.add_argument("--dpo-batch-size", type=int, default=8)
    parser.add_argument("--dpo-max-length", type=int, default=256, help="also ILQL's")
    parser.add_argument("--ilql-lr", type=float, default=2e-4, help="as recipes/ilql/smollm2.yaml")
    parser.add_argument("--ilql-alpha", type=float, default=0.005, help="Polyak rate, synced every step")
    parser.add_argument("--ilql-epochs", type=int, default=1)
    parser.add_argument("--ilql-betas", default="1,4", help="decoding β values to measure, comma-separated")
    parser.add_argument(
        "--ilql-rewards",
        choices=["reward_model", "pairs"],
        default="reward_model",
        help="the collected responses scored by the source's reward model (standardised), or the pairs as ±1 rows",
    )
    parser.add_argument("--methods", default="dpo,ilql")
    parser.add_argument(
        "--max-pairs", type=int, default=None, help="learn from this many of the collected pairs (seeded draw)"
    )
    parser.add_argument("--precision", default=None, help="override the pipeline's precision (e.g. 32-true)")
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.output_dir)
    pipeline_args = ["--config", args.config] + (["--precision", args.precision] if args.precision else [])
    config = pipeline_config(pipeline_args)
    rows = {"PPO (the source run)": source_row(source)}
    methods = args.methods.split(",")
    if "dpo" in methods:
        run_dir = out / "dpo"
        copy_run(source, run_dir)
        trained = train_dpo(config, source, run_dir, args)
        rows[f"DPO ({args.dpo_loss}, β {args.dpo_beta}, {args.dpo_epochs} epoch(s))"] = {
            **evaluate(run_dir, pipeline_args),
            **trained,
            "peak_rss_mb": peak_rss_mb(),
        }
    if "ilql" in methods:
        run_dir = out / "ilql"
        run_dir.mkdir(parents=True, exist_ok=True)
        module, trained = train_ilql(config, source, run_dir, args)
        betas = [float(b) for b in args.ilql_betas.split(",")]
        for name, row in evaluate_ilql(config, source, module, betas).items():
            rows[name] = {**row, **trained, "peak_rss_mb": peak_rss_mb()}
    (out / "offline.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "offline.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
