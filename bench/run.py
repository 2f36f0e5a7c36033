"""Side-by-side benchmarks against TRL: ``python bench/run.py --task rl|reward|sft|dpo|generation|all [--tiny]``.

Each side runs in its own process (the peers in their own venvs, see bench/README.md) with settings written by this
script, so model, data, batch sizes and lengths are identical. Prints ours / peer / ratio and writes
``bench/results/<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, matmul_peak_flops, set_threads  # noqa: E402

TRL_PYTHON = BENCH_DIR / ".venv-trl" / "bin" / "python"
TRL_PPO_PYTHON = BENCH_DIR / ".venv-trl-ppo" / "bin" / "python"
HH_RLHF = "hh-rlhf-harmless-dev.jsonl.gz"


def shared_data(name: str) -> Path:
    """A file of the project's shared data folder (beside the repository), never copied into it."""
    candidates = [BENCH_DIR.parent.parent / "shared" / "data" / name, Path("/work/shared/data") / name]
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} not found in {[str(p) for p in candidates]}; full runs need the shared data.")


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- settings per task, full and tiny ------------------------------------------------------------------------------


def rl_settings(tiny: bool, work: Path) -> dict[str, Any]:
    from lit_rlhf.data.prompts import load_prompts
    from lit_rlhf.models import resolve

    iterations = 2 if tiny else 5
    base = {
        "model": resolve("tiny-llama" if tiny else "smollm2-135m-instruct"),
        "iterations": iterations,
        "max_new_tokens": 8 if tiny else 32,
        "lr": 1e-5,
        "kl_coef": 0.05,
        "temperature": 1.0,
        "seed": 0,
    }
    prompts = load_prompts()[: 8 * iterations]
    base["prompts_file"] = write_jsonl([{"prompt": p} for p in prompts], work / "prompts.jsonl")
    # PPO: TRL's PPOTrainer samples one completion per prompt; RLOO / GRPO need groups of completions.
    ppo = {**base, "algorithm": "ppo", "epochs": 1, "prompts_per_iter": 2 if tiny else 8, "num_samples": 1}
    rloo = {**base, "algorithm": "rloo", "epochs": 1, "prompts_per_iter": 1 if tiny else 2, "num_samples": 4}
    # Our PPO two ways: a separate critic as TRL's (like for like), and the critic head on the policy trunk (our
    # pipeline's default; TRL's PPOTrainer has no such option).
    # GRPO as TRL 1.16's GRPOTrainer runs it by default: token-level loss (DAPO), group std, β·k3 in the loss.
    grpo = {**rloo, "algorithm": "grpo"}
    return {
        "ppo": {**ppo, "value_model": "separate"},
        "ppo_shared": {**ppo, "value_model": "shared"},
        "rloo": rloo,
        "grpo": grpo,
        "grpo_bf16_reference": {**grpo, "reference_dtype": "bfloat16"},
    }


def reward_settings(tiny: bool, work: Path) -> dict[str, Any]:
    from lit_rlhf.data.loading import split_off
    from lit_rlhf.data.preferences import read_preferences
    from lit_rlhf.models import load_tokenizer, resolve

    model = resolve("tiny-llama" if tiny else "all-minilm-l6-v2")
    max_length, batch_size, train_pairs, val_pairs = (320, 4, 8, 8) if tiny else (256, 8, 384, 128)
    if tiny:
        source = str(Path(__import__("lit_rlhf").__file__).parent / "data" / "examples" / "preferences_tiny.jsonl")
    else:
        source = str(shared_data(HH_RLHF))
    tokenizer = load_tokenizer(model, padding_side="right")
    train, val = split_off(read_preferences(source, tokenizer), 0.2, seed=0)  # the 80/20 split our module uses

    def fits(example) -> bool:
        # TRL drops pairs over max_length where we cut the prompt: keep only pairs neither side has to shorten.
        longest = max(len(tokenizer(example.prompt + r)["input_ids"]) for r in (example.chosen, example.rejected))
        return longest + 3 <= max_length

    def rows(examples, limit: int) -> list[dict[str, str]]:
        kept = [e for e in examples if fits(e)][:limit]
        return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in kept]

    return {
        "model": model,
        "train_file": write_jsonl(rows(train, train_pairs), work / "pairs_train.jsonl"),
        "val_file": write_jsonl(rows(val, val_pairs), work / "pairs_val.jsonl"),
        "max_length": max_length,
        "batch_size": batch_size,
        "epochs": 1 if tiny else 2,
        "lr": 5e-5,
        "seed": 0,
    }


def sft_settings(tiny: bool, work: Path) -> dict[str, Any]:
    from lit_rlhf.data.loading import split_off
    from lit_rlhf.data.sft import read_sft
    from lit_rlhf.models import load_tokenizer, resolve

    model = resolve("tiny-llama" if tiny else "smollm2-135m-instruct")
    max_length, batch_size, train_rows, val_rows = (320, 4, 8, 4) if tiny else (128, 4, 40, 12)
    if tiny:
        source = str(Path(__import__("lit_rlhf").__file__).parent / "data" / "examples" / "sft_tiny.jsonl")
    else:
        source = str(shared_data(HH_RLHF))  # hh-rlhf chosen transcripts: train on the final assistant reply
    tokenizer = load_tokenizer(model, padding_side="right")
    train, val = split_off(read_sft(source, tokenizer), 0.2, seed=0)

    def rows(examples, limit: int) -> list[dict[str, str]]:
        # Only rows that fit, so that neither side's truncation rule matters.
        kept = [e for e in examples if len(tokenizer(e.prompt + e.completion)["input_ids"]) + 2 <= max_length]
        return [{"prompt": e.prompt, "completion": e.completion} for e in kept[:limit]]

    return {
        "model": model,
        "train_file": write_jsonl(rows(train, train_rows), work / "sft_train.jsonl"),
        "val_file": write_jsonl(rows(val, val_rows), work / "sft_val.jsonl"),
        "max_length": max_length,
        "batch_size": batch_size,
        "epochs": 1,
        "lr": 2e-5,
        "seed": 0,
    }


def generation_settings(tiny: bool, work: Path) -> dict[str, Any]:
    from lit_rlhf.data.prompts import load_prompts
    from lit_rlhf.models import resolve

    return {
        "model": resolve("tiny-llama" if tiny else "smollm2-135m-instruct"),
        "prompts": load_prompts()[: 2 if tiny else 8],
        "max_new_tokens": 8 if tiny else 64,
        "repeats": 2 if tiny else 4,
    }


# --- running the sides ---------------------------------------------------------------------------------------------


def dpo_settings(tiny: bool, work: Path) -> dict[str, Any]:
    """DPO of SmolLM2 on hh-rlhf pairs (both sides: full fine-tune, a frozen copy as the reference)."""
    from lit_rlhf.data.loading import split_off
    from lit_rlhf.data.preferences import read_preferences
    from lit_rlhf.models import load_tokenizer, resolve

    model = resolve("tiny-llama" if tiny else "smollm2-135m-instruct")
    max_length, batch_size, train_pairs, val_pairs = (320, 4, 8, 8) if tiny else (256, 4, 48, 32)
    if tiny:
        source = str(Path(__import__("lit_rlhf").__file__).parent / "data" / "examples" / "preferences_tiny.jsonl")
    else:
        source = str(shared_data(HH_RLHF))
    tokenizer = load_tokenizer(model, padding_side="right")
    train, val = split_off(read_preferences(source, tokenizer), 0.2, seed=0)

    def rows(examples, limit: int) -> list[dict[str, str]]:
        # TRL keeps the start of a long sequence and we keep its end: use only pairs neither side has to cut.
        def fits(e) -> bool:
            return max(len(tokenizer(e.prompt + r)["input_ids"]) for r in (e.chosen, e.rejected)) + 2 <= max_length

        return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples if fits(e)][:limit]

    return {
        "model": model,
        "train_file": write_jsonl(rows(train, train_pairs), work / "dpo_train.jsonl"),
        "val_file": write_jsonl(rows(val, val_pairs), work / "dpo_val.jsonl"),
        "max_length": max_length,
        "batch_size": batch_size,
        "epochs": 1,
        "lr": 5e-6,
        "beta": 0.1,
        "precompute_reference": False,
        "seed": 0,
    }


def run_side(python: Path, script: str, task: str, config: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run one side in its own process; its peak RSS is that process's alone."""
    if not python.exists():
        return {"skipped": f"{python} not found (see bench/README.md to create it)"}
    config_path, out_path = work / f"{name}.config.json", work / f"{name}.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [str(python), str(BENCH_DIR / script), task, str(config_path), str(out_path)]
    print(f"  running {name} ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        print(tail, file=sys.stderr)
        return {"error": f"exit code {done.returncode}", "log_tail": tail}
    return json.loads(out_path.read_text())


# Each comparison: (row name, our script + task + settings key, peer python + script + task, metrics compared).
RL_METRICS = [
    ("seconds_per_1k_tokens", "s / iteration / 1k generated tokens", "<= 0.5"),
    ("peak_rss_mb", "peak RSS (MiB)", "<= 0.8"),
    ("reward_mean", "mean VADER reward over the iterations", None),
    ("reward_last", "VADER reward, last iteration", None),
]


def random_and_grouped(
    name: str, peer: str, task: str, settings: dict[str, Any], metrics: list[tuple[str, str, str | None]]
) -> list[dict[str, Any]]:
    """Two rows against one peer run: both sides on random batches, then ours with ``group_by_length``."""
    ours = Path(sys.executable)
    grouped = {**settings, "group_by_length": True}
    trl = (TRL_PYTHON, "peer_trl.py", task, settings, f"trl_{task}")
    return [
        {
            "row": f"{name}: ours vs {peer} (both: random batches)",
            "ours": (ours, "ours.py", task, settings, f"ours_{task}"),
            "peer": trl,
            "metrics": metrics,
        },
        {
            "row": f"{name}: ours with group_by_length vs {peer} (its default batches)",
            "ours": (ours, "ours.py", task, grouped, f"ours_{task}_grouped"),
            "peer": trl,
            "metrics": metrics,
        },
    ]


def comparisons(task: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    ours = Path(sys.executable)
    if task in ("rl", "rl-group"):
        rows = [
            {
                "row": "RL: our PPO (separate critic, as TRL's) vs TRL 0.25.1 PPOTrainer",
                "ours": (ours, "ours.py", "rl", settings["ppo"], "ours_ppo"),
                "peer": (TRL_PPO_PYTHON, "peer_trl_ppo.py", "ppo", settings["ppo"], "trl_ppo"),
                "metrics": RL_METRICS,
            },
            {
                "row": "RL: our PPO (critic head on the policy trunk) vs TRL 0.25.1 PPOTrainer",
                "ours": (ours, "ours.py", "rl", settings["ppo_shared"], "ours_ppo_shared"),
                "peer": (TRL_PPO_PYTHON, "peer_trl_ppo.py", "ppo", settings["ppo"], "trl_ppo"),
                "metrics": RL_METRICS,
            },
            {
                "row": "RL: our RLOO vs TRL 1.16 RLOOTrainer",
                "ours": (ours, "ours.py", "rl", settings["rloo"], "ours_rloo"),
                "peer": (TRL_PYTHON, "peer_trl.py", "rloo", settings["rloo"], "trl_rloo"),
                "metrics": RL_METRICS,
            },
            {
                "row": "RL: our GRPO vs TRL 1.16 GRPOTrainer",
                "ours": (ours, "ours.py", "rl", settings["grpo"], "ours_grpo"),
                "peer": (TRL_PYTHON, "peer_trl.py", "grpo", settings["grpo"], "trl_grpo"),
                "metrics": RL_METRICS,
            },
            {
                "row": "RL: our GRPO with a bfloat16 reference (reference_dtype) vs TRL 1.16 GRPOTrainer",
                "ours": (ours, "ours.py", "rl", settings["grpo_bf16_reference"], "ours_grpo_bf16_reference"),
                "peer": (TRL_PYTHON, "peer_trl.py", "grpo", settings["grpo"], "trl_grpo"),
                "metrics": RL_METRICS,
            },
        ]
        return rows if task == "rl" else [row for row in rows if "PPOTrainer" not in row["row"]]
    if task == "reward":
        metrics = [
            ("pairs_per_second", "pairs / s (training)", ">= 1.2"),
            ("accuracy", "held-out accuracy", "equal"),
            ("peak_rss_mb", "peak RSS (MiB)", None),
        ]
        return random_and_grouped("Reward model", "TRL 1.16 RewardTrainer", "reward", settings, metrics)
    if task == "sft":
        metrics = [
            ("tokens_per_second", "tokens / s (training)", ">= 1.2"),
            ("eval_loss", "held-out loss", "equal"),
            ("train_loss_mean", "mean training loss", None),
            ("peak_rss_mb", "peak RSS (MiB)", None),
        ]
        return random_and_grouped("SFT", "TRL 1.16 SFTTrainer", "sft", settings, metrics)
    if task == "dpo":
        metrics = [
            ("pairs_per_second", "pairs / s (training)", ">= 1.2"),
            ("eval_loss", "held-out DPO loss", "equal"),
            ("accuracy", "held-out reward accuracy", "equal"),
            ("peak_rss_mb", "peak RSS (MiB)", None),
        ]
        cached = {**settings, "precompute_reference": True}
        return [
            {
                "row": "DPO: ours vs TRL 1.16 DPOTrainer (both: frozen reference copy, random batches)",
                "ours": (ours, "ours.py", "dpo", settings, "ours_dpo"),
                "peer": (TRL_PYTHON, "peer_trl.py", "dpo", settings, "trl_dpo"),
                "metrics": metrics,
            },
            {
                "row": "DPO: ours vs TRL 1.16 DPOTrainer (both: reference log-probs precomputed before training)",
                "ours": (ours, "ours.py", "dpo", cached, "ours_dpo_cached"),
                "peer": (TRL_PYTHON, "peer_trl.py", "dpo", cached, "trl_dpo_cached"),
                "metrics": metrics,
            },
        ]
    return [
        {
            "row": "Generation: RLHFModule.generate vs plain model.generate",
            "ours": (ours, "ours.py", "generation", settings, "ours_generation"),
            "peer": (ours, "peer_generate.py", "generation", settings, "hf_generate"),
            "metrics": [("tokens_per_second", "generated tokens / s", None), ("peak_rss_mb", "peak RSS (MiB)", None)],
        }
    ]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_task(task: str, tiny: bool, sides: str, threads: int, precision: str, peak: float) -> dict[str, Any]:
    builders = {"rl": rl_settings, "rl-group": rl_settings, "reward": reward_settings, "sft": sft_settings}
    builders["generation"], builders["dpo"] = generation_settings, dpo_settings
    work = Path(tempfile.mkdtemp(prefix=f"lit-rlhf-bench-{task}-"))
    settings = builders[task](tiny, work)
    for value in settings.values() if task.startswith("rl") else [settings]:
        value.update(threads=threads, precision=precision, gradient_checkpointing=False, group_by_length=False)
    cache: dict[str, dict[str, Any]] = {}
    rows = []
    for comparison in comparisons(task, settings):
        results = {}
        for side in ("ours", "peer"):
            python, script, side_task, config, name = comparison[side]
            if sides not in ("both", side):
                results[side] = {"skipped": f"--sides {sides}"}
            elif name not in cache:
                cache[name] = results[side] = run_side(python, script, side_task, config, work, name)
            else:
                results[side] = cache[name]
        table = []
        for key, label, target in comparison["metrics"]:
            ours_value, peer_value = results["ours"].get(key), results["peer"].get(key)
            ratio = ours_value / peer_value if isinstance(ours_value, float) and isinstance(peer_value, float) else None
            table.append({"metric": label, "ours": ours_value, "peer": peer_value, "ratio": ratio, "target": target})
        if "achieved_flops" in results["ours"]:
            share = results["ours"]["achieved_flops"] / peak
            table.append({"metric": "ours: achieved FLOP/s / matmul peak", "ours": share, "target": ">= 0.4"})
        rows.append({"row": comparison["row"], "table": table, "ours": results["ours"], "peer": results["peer"]})
        print(f"\n{comparison['row']}")
        print(f"  {'metric':40} {'ours':>10} {'peer':>10} {'ours/peer':>10}  target")
        for line in table:
            print(
                f"  {line['metric']:40} {fmt(line['ours']):>10} {fmt(line.get('peer')):>10} "
                f"{fmt(line.get('ratio')):>10}  {line['target'] or ''}"
            )
        for side in ("ours", "peer"):
            problem = results[side].get("skipped") or results[side].get("error")
            if problem:
                print(f"  ({side}: {problem})")
    return {"task": task, "tiny": tiny, "settings": settings, "rows": rows}


def markdown_table(result: dict[str, Any], command: str) -> str:
    """One task's rows as the Markdown table of bench/README.md: comparison, metric, ours, peer, ratio, target."""
    lines = ["| comparison | metric | ours | peer | ours / peer | target |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for row in result["rows"]:
        for i, line in enumerate(row["table"]):
            name = row["row"] if i == 0 else ""
            cells = [fmt(line["ours"]), fmt(line.get("peer")), fmt(line.get("ratio")), line["target"] or ""]
            lines.append(f"| {name} | {line['metric']} | " + " | ".join(cells) + " |")
        for side in ("ours", "peer"):
            problem = row[side].get("skipped") or row[side].get("error")
            if problem:
                lines.append(f"| | {side}: {problem} | | | | |")
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task",
        choices=["rl", "rl-group", "reward", "sft", "dpo", "generation", "all"],
        default="all",
        help="rl-group: the RL rows without a critic only (RLOO, GRPO), which need only bench/.venv-trl",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny-llama and a few steps: checks the scripts run")
    parser.add_argument("--sides", choices=["both", "ours", "peer"], default="both")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="torch threads per side")
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="both sides: bf16 autocast (TRL's default, and ours on CPUs with bf16 matmuls) or float32",
    )
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="folder for the JSON results")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    size = 512 if args.tiny else 2048
    peaks = {name: matmul_peak_flops(size, dtype=name) for name in ("fp32", "bf16")}
    machine = {
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "precision": args.precision,
        **{f"matmul_peak_gflops_{name}": value / 1e9 for name, value in peaks.items()},
    }
    for name, value in peaks.items():
        print(f"{name} matmul peak on {args.threads} thread(s): {value / 1e9:.1f} GFLOP/s")
    tasks = ["rl", "reward", "sft", "dpo", "generation"] if args.task == "all" else [args.task]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for task in tasks:
        result = run_task(task, args.tiny, args.sides, args.threads, args.precision, peaks[args.precision])
        result["machine"] = machine
        name = f"{task}-tiny.json" if args.tiny else f"{task}.json"
        (out / name).write_text(json.dumps(result, indent=2, default=str))
        command = f"python bench/run.py --task {task} --precision {args.precision}" + (" --tiny" if args.tiny else "")
        (out / name.replace(".json", ".md")).write_text(markdown_table(result, command))
        failed = failed or any("error" in row[side] for row in result["rows"] for side in ("ours", "peer"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
