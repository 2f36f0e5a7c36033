"""Optimizer and learning-rate schedule construction shared by the supervised stages."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

SchedulerName = Literal["constant", "linear", "cosine"]


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that receive gradients (LoRA leaves the base weights frozen)."""
    return [p for p in module.parameters() if p.requires_grad]


def require_trainable(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """``params``, or an error that says why there are none (the usual cause: Lightning's bitsandbytes plugin)."""
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters. Lightning's BitsandbytesPrecision plugin quantises "
            "(and so freezes) every nn.Linear, LoRA adapters included: to train on quantised weights use the module's "
            "load_in_4bit / load_in_8bit with lora instead (QLoRA)."
        )
    return params


def build_optimizers(
    module: L.LightningModule,
    factory: OptimizerCallable | None,
    learning_rate: float,
    weight_decay: float,
    scheduler: SchedulerName,
    warmup_ratio: float,
):
    """AdamW (or ``factory``) over the trainable parameters; linear warm-up, then ``scheduler``, stepped per step."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
    params = require_trainable(module, trainable_parameters(module))
    if factory is None:
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    else:
        optimizer = factory(params)
    if scheduler == "constant" and warmup_ratio == 0:
        return optimizer
    from transformers import get_scheduler

    total = max(1, int(module.trainer.estimated_stepping_batches))
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[scheduler]
    schedule = get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * total), num_training_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
