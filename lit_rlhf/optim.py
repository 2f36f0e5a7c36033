"""What the supervised stages share: optimizer and schedule construction, and their common Lightning hooks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from lit_rlhf.models import LoraOptions, export_pretrained, is_quantised
from lit_rlhf.scale import check_strategy, clip_grad_norm, uses_grad_scaler

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


# Devices whose AdamW has a fused kernel (torch >= 2.4 for the CPU); parameters elsewhere get the per-tensor loop.
FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps"})


def adamw(params, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel over all tensors where every parameter allows it.

    ``params`` is a list of parameters or of parameter groups; ``fused=False`` asks for torch's default (needed under
    a loss scaler, see ``scale.uses_grad_scaler``). Without ``fused`` torch picks its per-tensor loop on a
    CPU, which costs 0.68 s per step for a 135M model on this project's 2-core bench machine against 0.06 s fused
    (``bench/README.md``); the update is the same (AdamW, Loshchilov & Hutter 2019). Non-float parameters or other
    devices fall back to torch's own default.
    """
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    supported = all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in tensors)
    fused = fused and bool(tensors) and supported
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


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
        optimizer = adamw(params, learning_rate, weight_decay, fused=not uses_grad_scaler(module))
    else:
        optimizer = factory(params)
    if scheduler == "constant" and warmup_ratio == 0:
        return optimizer
    from transformers import get_scheduler

    total = max(1, int(module.trainer.estimated_stepping_batches))
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[scheduler]
    schedule = get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * total), num_training_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class FineTuningModule(L.LightningModule):
    """The hooks the supervised stages (SFT, reward model) share: optimizer and schedule from their hyperparameters,
    FSDP-aware gradient clipping, the strategy check, and the export to a plain transformers folder.

    Subclasses set ``self.model`` (through ``load_trainable``), ``self.tokenizer`` and ``self.optimizer_factory`` and
    save the hyperparameters ``learning_rate``, ``weight_decay``, ``scheduler``, ``warmup_ratio`` and those
    ``load_trainable`` reads.
    """

    def load_trainable(
        self, loader: Callable[..., torch.nn.Module], name: str, lora: LoraOptions | None
    ) -> torch.nn.Module:
        """``loader(name, lora=lora, ...)`` with the saved hyperparameters ``dtype``, ``load_in_8bit``,
        ``load_in_4bit`` and ``attn_implementation``, in train mode, with ``gradient_checkpointing`` if set;
        quantised weights are frozen, so they need ``lora``."""
        hp = self.hparams
        if (hp.load_in_8bit or hp.load_in_4bit) and lora is None:
            raise ValueError("load_in_8bit / load_in_4bit freeze the base weights: set model.lora to train adapters.")
        model = loader(
            name,
            lora=lora,
            dtype=hp.dtype,
            load_in_8bit=hp.load_in_8bit,
            load_in_4bit=hp.load_in_4bit,
            attn_implementation=hp.attn_implementation,
        )
        model.train()  # from_pretrained returns eval mode; dropout belongs in fine-tuning
        if hp.gradient_checkpointing:
            # Non-reentrant: gradients then reach LoRA weights even though the frozen inputs need none.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def setup(self, stage: str) -> None:
        check_strategy(self, quantised=is_quantised(self.model))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm(self, optimizer, gradient_clip_val)  # FSDP-aware
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return build_optimizers(
            self,
            self.optimizer_factory,
            self.hparams.learning_rate,
            self.hparams.weight_decay,
            self.hparams.scheduler,
            self.hparams.warmup_ratio,
        )

    def export_model(self):
        """The model and tokenizer to save in plain transformers format (see ``HFExportCallback``)."""
        return self.model, self.tokenizer

    def export(self, path: str | Path) -> Path:
        """Save a folder that the matching transformers Auto class loads with ``from_pretrained`` (LoRA merged)."""
        return export_pretrained(self.model, self.tokenizer, path)
