"""Peak resident memory of one short stage run on the CPU, as the user would start it (the numbers in
docs/scaling.md). Each run is a fresh process; the baseline is the process after importing torch, transformers and
lit_rlhf, before any model is loaded.

    python scripts/peak_rss.py sft fit --config recipes/sft/smollm2.yaml --trainer.max_steps 1 ...
    python scripts/peak_rss.py --table      # every row of the docs table (a few minutes on 2 cores)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

# One optimizer step / one RL iteration, no validation, logging, checkpoints or exports.
ONE_STEP = [
    "--trainer.max_steps", "1", "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1",
    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
    "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "null", "--trainer.accelerator", "cpu",
]  # fmt: skip
ADAMW8BIT = '{"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 1.0e-4}}'
SFT = ["sft", "fit", "--config", "recipes/sft/smollm2.yaml", "--data.batch_size", "4", "--data.max_length", "128"]
QLORA = ["sft", "fit", "--config", "recipes/sft/smollm2_qlora.yaml", "--data.batch_size", "4"]
RM = ["reward", "fit", "--config", "recipes/reward/minilm_hh.yaml", "--model.backbone", "smollm2-135m-instruct"]
RM += ["--data.train_path", "lit_rlhf/data/examples/preferences_tiny.jsonl", "--data.batch_size", "4"]
RM += ["--data.max_length", "128"]
RL = ["rl", "fit", "--config", "recipes/rl/ppo_smollm2.yaml", "--data.batch_size", "4"]
RL += ["--model.generation.max_new_tokens", "16", "--model.algorithm.init_args.epochs", "1"]
RL += ["--model.algorithm.init_args.num_minibatches", "1"]
RL8 = ["rl", "fit", "--config", "recipes/rl/ppo_smollm2_8bit.yaml", "--data.batch_size", "4"]
RL8 += ["--model.generation.max_new_tokens", "16", "--model.algorithm.init_args.epochs", "1"]
RL8 += ["--model.algorithm.init_args.num_minibatches", "1"]
NO_LORA = ["--model.lora", "null"]
TABLE = {
    "SFT, full, AdamW": SFT + NO_LORA,
    "SFT, full, AdamW8bit": SFT + NO_LORA + ["--model.optimizer", ADAMW8BIT],
    "SFT, LoRA r16, AdamW": SFT,
    "SFT, QLoRA 4-bit r16, AdamW8bit, checkpointing": QLORA + ["--data.max_length", "128"],
    "RM, full, AdamW": RM,
    "RM, LoRA r16, AdamW": RM + ["--model.lora", '{"r": 16, "alpha": 32}'],
    "RL (PPO), full: policy + reference + value, AdamW": RL + NO_LORA,
    "RL (PPO), LoRA r16: policy + value adapters, AdamW": RL,
    "RL (PPO), 8-bit base + LoRA r16, AdamW8bit, checkpointing": RL8,
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: list[str]) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    from lit_rlhf.cli import run_stage

    baseline = rss_mb()
    run_stage(args[0], args[1:] + ONE_STEP)
    return {"baseline_mb": round(baseline), "peak_mb": round(rss_mb())}


def table() -> None:
    print("| run | peak RSS (MB) | above baseline (MB) |\n| --- | ---: | ---: |")
    for name, args in TABLE.items():
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1:]} | |", flush=True)
            continue
        result = json.loads(lines[-1])
        print(f"| {name} | {result['peak_mb']} | {result['peak_mb'] - result['baseline_mb']} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        table()
    else:
        print(json.dumps(measure(sys.argv[1:])))
