"""Helpers shared by the RL tests (no tests here): tiny prompt loaders, module factory, a quiet Trainer."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_rlhf.models import load_tokenizer
from lit_rlhf.rewards import CharacterShareReward
from lit_rlhf.rl import GenerationOptions, RLHFModule

PROMPTS = ["hello", "say a", "what is up?", "abc", "tell me a story", "x", "list fruits", "ok"]


def prompt_batch(prompts: list[str]) -> dict[str, Any]:
    """A ``PromptDataModule``-style batch: raw texts and left-padded ids from the tiny-llama tokenizer."""
    tokenizer = load_tokenizer("tiny-llama")
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"prompt": list(prompts), "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def prompt_loader(prompts: list[str] = PROMPTS, batch_size: int | None = None) -> DataLoader:
    """In-order batches of ``prompts`` (one batch per epoch by default, so checkpoints fall on epoch ends)."""
    return DataLoader(prompts, batch_size=batch_size or len(prompts), shuffle=False, collate_fn=prompt_batch)


def tiny_module(**kwargs: Any) -> RLHFModule:
    """An ``RLHFModule`` on tiny-llama rewarded for the letter "a", short responses, fixed seed."""
    torch.manual_seed(0)
    defaults: dict[str, Any] = {
        "reward": CharacterShareReward("a"),
        "generation": GenerationOptions(max_new_tokens=8),
        "learning_rate": 1e-3,
        "rollout_seed": 0,
    }
    return RLHFModule("tiny-llama", **{**defaults, **kwargs})


class Outputs(L.Callback):
    """Keeps what every training_step returned."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outputs.append(outputs)


def trainer(max_epochs: int, callbacks: list[L.Callback] | None = None, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer; one iteration per epoch with ``prompt_loader()``."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks or [],
    }
    return L.Trainer(**{**options, **kwargs})


class KillAt(L.Callback):
    """Kills its own process with SIGKILL once ``iteration`` RL iterations are done, before a checkpoint of that
    iteration can be written (Lightning runs checkpoint callbacks last): a crash in the middle of a run."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.iteration == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
