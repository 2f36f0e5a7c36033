"""The TRL side (current release) of each benchmark, run by ``bench/run.py`` in ``bench/.venv-trl``:
``peer_trl.py TASK CONFIG.json OUT.json`` with TASK ``grpo``, ``rloo``, ``reward``, ``sft``, ``dpo`` or ``generation``.

Settings come from the same CONFIG as our side; nothing here imports lit_rlhf (its pins differ from TRL's).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import read_config, rl_timing, set_threads, steady_mean, write_result  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (generation included for the online trainers)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def common_args(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_dir": tempfile.mkdtemp(prefix="trl-bench-"),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "seed": cfg["seed"],
        "learning_rate": cfg["lr"],
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # TRL defaults to bf16 and gradient checkpointing even on a CPU: state both, as the driver set them for us too.
        "bf16": cfg["precision"] == "bf16",
        "gradient_checkpointing": cfg["gradient_checkpointing"],
    }


def run_online(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """GRPOTrainer or RLOOTrainer: ``prompts_per_iter`` prompts × ``num_samples`` completions per optimizer step."""
    from datasets import Dataset
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scores: list[float] = []
    tokens: list[int] = []

    def vader(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        values = [analyzer.polarity_scores(t)["compound"] for t in texts]
        scores.append(sum(values) / len(values))
        tokens.append(sum(len(ids) for ids in completion_ids))
        return values

    prompts = [json.loads(line)["prompt"] for line in Path(cfg["prompts_file"]).read_text().splitlines()]
    rows = cfg["prompts_per_iter"] * cfg["num_samples"]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    settings = {
        **common_args(cfg),
        "per_device_train_batch_size": rows,
        "num_generations": cfg["num_samples"],
        "max_completion_length": cfg["max_new_tokens"],
        "max_steps": cfg["iterations"],
        "beta": cfg["kl_coef"],
        "num_iterations": 1,
        "temperature": cfg["temperature"],
        "top_p": 1.0,
        "top_k": 0,
        "shuffle_dataset": False,
    }
    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    torch.manual_seed(cfg["seed"])
    clock = StepClock()
    trainer = Trainer(model=cfg["model"], reward_funcs=[vader], args=Config(**settings), train_dataset=dataset)
    trainer.add_callback(clock)
    trainer.train()
    return rl_timing(clock.durations, tokens, scores)


def run_reward(cfg: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        # RewardTrainer appends the EOS text to every response and fails on a BERT tokenizer, which has none; its
        # [SEP] ends every encoded sequence anyway (TRL's texts then end in two [SEP]s: one token more than ours).
        tokenizer.eos_token = tokenizer.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg["model"], num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    args = RewardConfig(
        **common_args(cfg),
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        num_train_epochs=cfg["epochs"],
        max_length=cfg["max_length"],
        disable_dropout=False,  # our module trains with the backbone's dropout on
        center_rewards_coefficient=None,
        eval_strategy="no",
    )
    clock = StepClock()
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(read_jsonl(cfg["train_file"])),
        eval_dataset=Dataset.from_list(read_jsonl(cfg["val_file"])),
        processing_class=tokenizer,
    )
    trainer.add_callback(clock)
    trainer.train()
    metrics = trainer.evaluate()
    return {
        "pairs_per_second": steady_mean([cfg["batch_size"] / d for d in clock.durations]),
        "steps": len(clock.durations),
        "train_seconds": sum(clock.durations),
        "accuracy": float(metrics["eval_accuracy"]),
        "eval_loss": float(metrics["eval_loss"]),
    }


def run_sft(cfg: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    args = SFTConfig(
        **common_args(cfg),
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        num_train_epochs=cfg["epochs"],
        max_length=cfg["max_length"],
        completion_only_loss=True,
        packing=False,
        eval_strategy="no",
    )
    tokens: list[int] = []
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(read_jsonl(cfg["train_file"])),
        eval_dataset=Dataset.from_list(read_jsonl(cfg["val_file"])),
        processing_class=tokenizer,
    )
    # Count the real (unpadded) tokens of every training batch as it enters the model.
    original = trainer.compute_loss

    def counting_compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            tokens.append(int(inputs["attention_mask"].sum()))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_compute_loss
    trainer.add_callback(clock)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = trainer.evaluate()
    return {
        "tokens_per_second": steady_mean([n / d for n, d in zip(tokens, clock.durations, strict=True)]),
        "steps": len(clock.durations),
        "train_loss_mean": sum(losses) / len(losses),
        "eval_loss": float(metrics["eval_loss"]),
    }


def run_dpo(cfg: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    args = DPOConfig(
        **common_args(cfg),
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        num_train_epochs=cfg["epochs"],
        max_length=cfg["max_length"],
        beta=cfg["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=cfg["precompute_reference"],
        eval_strategy="no",
    )
    clock = StepClock()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(read_jsonl(cfg["train_file"])),
        eval_dataset=Dataset.from_list(read_jsonl(cfg["val_file"])),
        processing_class=tokenizer,
    )
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    fit_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    return {
        "pairs_per_second": steady_mean([cfg["batch_size"] / d for d in clock.durations]),
        "steps": len(clock.durations),
        "train_seconds": sum(clock.durations),
        "fit_seconds": fit_seconds,
        "eval_loss": float(metrics["eval_loss"]),
        "accuracy": float(metrics["eval_rewards/accuracies"]),
    }


TASKS = {
    "grpo": lambda cfg: run_online(cfg, "grpo"),
    "rloo": lambda cfg: run_online(cfg, "rloo"),
    "reward": run_reward,
    "sft": run_sft,
    "dpo": run_dpo,
}

if __name__ == "__main__":
    task = sys.argv.pop(1)
    config = read_config()
    set_threads(config["threads"])
    write_result(TASKS[task](config))
