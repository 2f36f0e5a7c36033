"""Our side of each benchmark, run by ``bench/run.py`` in the project's venv: ``ours.py TASK CONFIG.json OUT.json``.

TASK is ``rl``, ``reward``, ``sft``, ``dpo`` or ``generation``; CONFIG holds the settings both sides share.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import count_params, read_config, rl_iteration_flops, rl_timing, set_threads, steady_mean, write_result  # noqa: E402


class StepClock(L.Callback):
    """Wall time of every training batch, and what each ``training_step`` returned."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.outputs: list[Any] = []
        self.batches: list[Any] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.durations.append(time.perf_counter() - self._start)
        self.outputs.append(outputs)
        self.batches.append(batch)


def quiet_trainer(callbacks: list[L.Callback], precision: str = "fp32", **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def run_rl(cfg: dict[str, Any]) -> dict[str, Any]:
    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.judges import VaderJudge
    from lit_rlhf.rl import GRPO, PPO, RLOO, GenerationOptions, RLHFModule
    from lit_rlhf.rl.kl import FixedKL

    if cfg["algorithm"] == "ppo":
        algorithm, value_model = PPO(epochs=cfg["epochs"], num_minibatches=1), cfg.get("value_model", "separate")
    elif cfg["algorithm"] == "grpo":  # TRL 1.16's GRPOTrainer defaults: loss_type "dapo", group std, k3 in the loss
        algorithm, value_model = GRPO(loss_aggregation="token", scale_rewards="group", kl_penalty="loss"), "none"
    else:
        algorithm, value_model = RLOO(), "none"
    torch.manual_seed(cfg["seed"])
    module = RLHFModule(
        cfg["model"],
        reward=VaderJudge(),
        algorithm=algorithm,
        kl=FixedKL(cfg["kl_coef"]),
        generation=GenerationOptions(
            max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], num_samples=cfg["num_samples"]
        ),
        value_model=value_model,
        learning_rate=cfg["lr"],
        max_grad_norm=1.0,
        rollout_seed=cfg["seed"],
        gradient_checkpointing=cfg["gradient_checkpointing"],
        reference_dtype=cfg.get("reference_dtype"),
    )
    data = PromptDataModule(
        cfg["model"], path=cfg["prompts_file"], batch_size=cfg["prompts_per_iter"], shuffle=False, val_limit=1
    )
    clock = StepClock()
    trainer = quiet_trainer(
        [clock], cfg["precision"], max_epochs=1, limit_train_batches=cfg["iterations"], limit_val_batches=0
    )
    trainer.fit(module, data)
    scores = [float(out["scores"].mean()) for out in clock.outputs]
    tokens = [out["metrics"]["response/length"] * len(out["completions"]) for out in clock.outputs]
    timing = rl_timing(clock.durations, tokens, scores)
    trunk, head = count_params(module.policy)
    rows = len(clock.outputs[-1]["completions"])
    prompt = clock.batches[-1]["input_ids"].shape[1]
    reused = module.update_reuses_rollout_forward()
    flops = rl_iteration_flops(
        trunk, head, rows, prompt, cfg["max_new_tokens"], algorithm.schedule.epochs, value_model, True, reused
    )
    return {**timing, "flops_per_iteration": flops, "achieved_flops": flops / timing["seconds_per_iteration"]}


def run_reward(cfg: dict[str, Any]) -> dict[str, Any]:
    from lit_rlhf.data.preferences import PreferenceDataModule
    from lit_rlhf.reward import RewardModelModule

    torch.manual_seed(cfg["seed"])
    module = RewardModelModule(
        backbone=cfg["model"],
        learning_rate=cfg["lr"],
        weight_decay=0.0,
        scheduler="constant",
        warmup_ratio=0.0,
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    data = PreferenceDataModule(
        cfg["model"],
        train_path=cfg["train_file"],
        val_path=cfg["val_file"],
        max_length=cfg["max_length"],
        batch_size=cfg["batch_size"],
        group_by_length=cfg["group_by_length"],
        seed=cfg["seed"],
    )
    clock = StepClock()
    trainer = quiet_trainer([clock], cfg["precision"], max_epochs=cfg["epochs"], limit_val_batches=0)
    trainer.fit(module, data)
    pairs = steady_mean([cfg["batch_size"] / d for d in clock.durations])
    trainer = quiet_trainer([], cfg["precision"], limit_val_batches=1.0)
    metrics = trainer.validate(module, data.val_dataloader(), verbose=False)[0]
    return {
        "pairs_per_second": pairs,
        "steps": len(clock.durations),
        "train_seconds": sum(clock.durations),
        "accuracy": float(metrics["val/accuracy"]),
        "eval_loss": float(metrics["val/loss"]),
    }


def run_sft(cfg: dict[str, Any]) -> dict[str, Any]:
    from lit_rlhf.data.sft import SFTDataModule
    from lit_rlhf.sft import SFTModule

    torch.manual_seed(cfg["seed"])
    module = SFTModule(
        cfg["model"],
        learning_rate=cfg["lr"],
        scheduler="constant",
        warmup_ratio=0.0,
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    data = SFTDataModule(
        cfg["model"],
        train_path=cfg["train_file"],
        val_path=cfg["val_file"],
        max_length=cfg["max_length"],
        batch_size=cfg["batch_size"],
        chat_template=False,  # the driver already rendered the conversations
        group_by_length=cfg["group_by_length"],
        seed=cfg["seed"],
    )
    tokens: list[int] = []

    class CountTokens(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            tokens.append(int(batch["attention_mask"].sum()))

    clock = StepClock()
    trainer = quiet_trainer([CountTokens(), clock], cfg["precision"], max_epochs=cfg["epochs"], limit_val_batches=0)
    trainer.fit(module, data)
    losses = [float(out["loss"]) for out in clock.outputs]
    metrics = quiet_trainer([], cfg["precision"]).validate(module, data.val_dataloader(), verbose=False)[0]
    return {
        "tokens_per_second": steady_mean([n / d for n, d in zip(tokens, clock.durations, strict=True)]),
        "steps": len(losses),
        "train_loss_mean": sum(losses) / len(losses),
        "eval_loss": float(metrics["val/loss"]),
    }


def run_dpo(cfg: dict[str, Any]) -> dict[str, Any]:
    from lit_rlhf.data.preferences import PreferenceDataModule
    from lit_rlhf.dpo import DPOModule

    torch.manual_seed(cfg["seed"])
    module = DPOModule(
        cfg["model"],
        beta=cfg["beta"],
        precompute_reference=cfg["precompute_reference"],
        learning_rate=cfg["lr"],
        scheduler="constant",
        warmup_ratio=0.0,
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    data = PreferenceDataModule(
        cfg["model"],
        train_path=cfg["train_file"],
        val_path=cfg["val_file"],
        max_length=cfg["max_length"],
        batch_size=cfg["batch_size"],
        encoding="causal_lm",
        group_by_length=cfg["group_by_length"],
        seed=cfg["seed"],
    )
    clock = StepClock()
    trainer = quiet_trainer([clock], cfg["precision"], max_epochs=cfg["epochs"], limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, data)
    fit_seconds = time.perf_counter() - start
    metrics = quiet_trainer([], cfg["precision"]).validate(module, data.val_dataloader(), verbose=False)[0]
    return {
        "pairs_per_second": steady_mean([cfg["batch_size"] / d for d in clock.durations]),
        "steps": len(clock.durations),
        "train_seconds": sum(clock.durations),
        "fit_seconds": fit_seconds,
        "eval_loss": float(metrics["val/loss"]),
        "accuracy": float(metrics["val/rewards/accuracy"]),
    }


def run_generation(cfg: dict[str, Any]) -> dict[str, Any]:
    from lit_rlhf.rl import GenerationOptions, PolicyGenerator

    options = GenerationOptions(max_new_tokens=cfg["max_new_tokens"], do_sample=False)
    module = PolicyGenerator.load(cfg["model"], options, reference=False)
    durations, counts = [], []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        completions = module.generate(cfg["prompts"], options, batch_size=len(cfg["prompts"]))
        durations.append(time.perf_counter() - start)
        # Count as the rollout does: the response tokens up to and including the stop.
        counts.append(sum(min(len(module.tokenizer(c)["input_ids"]) + 1, cfg["max_new_tokens"]) for c in completions))
    return {"tokens_per_second": steady_mean([n / d for n, d in zip(counts, durations, strict=True)])}


TASKS = {"rl": run_rl, "reward": run_reward, "sft": run_sft, "dpo": run_dpo, "generation": run_generation}

if __name__ == "__main__":
    task = sys.argv.pop(1)
    config = read_config()
    set_threads(config["threads"])
    write_result(TASKS[task](config))
