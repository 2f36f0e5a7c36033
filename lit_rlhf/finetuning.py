"""What the training stages share: optimizer and schedule construction, the supervised stages' Lightning hooks, and
the export to plain transformers checkpoints (LoRA merged)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_rlhf.freezing import check_trainable_layers
from lit_rlhf.models import LoraOptions, is_quantised, require_lora_for_quantisation
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
    params = require_trainable(module, trainable_parameters(module))
    if factory is None:
        optimizer = adamw(params, learning_rate, weight_decay, fused=not uses_grad_scaler(module))
    else:
        optimizer = factory(params)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    schedule = lr_schedule(optimizer, scheduler, total, int(warmup_ratio * total))
    return optimizer if schedule is None else {"optimizer": optimizer, "lr_scheduler": schedule}


def lr_schedule(
    optimizer: torch.optim.Optimizer, scheduler: SchedulerName, total_steps: int, warmup_steps: int = 0
) -> dict | None:
    """A linear warm-up over ``warmup_steps``, then ``scheduler`` (constant, or linear / cosine decay to 0 at
    ``total_steps``), as Lightning's ``lr_scheduler`` entry stepped every step; None for a constant rate."""
    if scheduler == "constant" and warmup_steps == 0:
        return None
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[scheduler]
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return {"scheduler": schedule, "interval": "step"}


def check_finite(parameters: Iterable[torch.nn.Parameter], where: str, advice: str) -> None:
    """Stop the run when a trained weight is no longer finite (nan or inf), before a callback can checkpoint or export
    it: one norm over the trainable parameters, which is nan or inf exactly when one of them is."""
    tensors = [p.detach() for p in parameters if p.requires_grad]
    if tensors and not torch.isfinite(torch.nn.utils.get_total_norm(tensors)):
        raise FloatingPointError(f"{where}: trained weights are no longer finite (nan or inf); {advice}")


def check_finite_loss(loss: torch.Tensor, where: str, advice: str) -> None:
    """Stop the run at a loss that is nan or inf, before its gradients reach the weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: the loss is {loss.item()}; {advice}")


def check_finetuning_arguments(arguments: Mapping[str, Any], prefix: str = "model.") -> None:
    """Fail on ``SFTModule`` / ``RewardModelModule`` arguments that cannot work, before any weights are read; errors
    name them ``{prefix}{argument}`` as the user wrote them."""
    if not arguments["learning_rate"] > 0:
        raise ValueError(f"{prefix}learning_rate must be > 0, got {arguments['learning_rate']}.")
    if not arguments["weight_decay"] >= 0:
        raise ValueError(f"{prefix}weight_decay must be >= 0, got {arguments['weight_decay']}.")
    if not 0.0 <= arguments["warmup_ratio"] < 1.0:
        raise ValueError(f"{prefix}warmup_ratio must be in [0, 1), got {arguments['warmup_ratio']}.")
    require_lora_for_quantisation(arguments["lora"], arguments["load_in_8bit"], arguments["load_in_4bit"], prefix)
    check_trainable_layers(arguments.get("trainable_layers"), prefix=prefix)


class Exportable:
    """``export(path)`` for a LightningModule: its ``export_model()`` saved as a plain transformers checkpoint, and
    its ``export_critic()``, when it has one, beside it in ``critic/``."""

    def export_model(self) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
        """The model and tokenizer to save in plain transformers format (see ``HFExportCallback``)."""
        raise NotImplementedError

    def export_critic(self) -> nn.Module | None:
        """A critic to save with the model, in its ``critic/`` subfolder and with its tokenizer; None: no critic."""
        return None

    def export_extras(self, path: Path) -> None:
        """Save whatever else the export needs into ``path``, beside the model (ILQL's value heads); default none."""
        return None

    def export(self, path: str | Path) -> Path:
        """Save a folder that the matching transformers Auto class loads with ``from_pretrained`` (LoRA merged)."""
        return export_module(self, path)


class FineTuningModule(Exportable, L.LightningModule):
    """The hooks the supervised stages (SFT, reward model) share: optimizer and schedule from their hyperparameters,
    FSDP-aware gradient clipping, the strategy check, and ``export``.

    Subclasses set ``self.model`` (through ``load_trainable``), ``self.tokenizer`` and ``self.optimizer_factory`` and
    save the hyperparameters ``learning_rate``, ``weight_decay``, ``scheduler``, ``warmup_ratio`` and those
    ``load_trainable`` reads.
    """

    def load_trainable(
        self, loader: Callable[..., torch.nn.Module], name: str, lora: LoraOptions | None
    ) -> torch.nn.Module:
        """``loader(name, lora=lora, ...)`` with the saved hyperparameters ``dtype``, ``load_in_8bit``,
        ``load_in_4bit``, ``attn_implementation`` and ``trainable_layers``, in train mode, with
        ``gradient_checkpointing`` if set. The hyperparameters are checked first (``check_finetuning_arguments``), so
        bad ones fail before any weights load."""
        hp = self.hparams
        check_finetuning_arguments(hp)
        model = loader(
            name,
            lora=lora,
            dtype=hp.dtype,
            load_in_8bit=hp.load_in_8bit,
            load_in_4bit=hp.load_in_4bit,
            attn_implementation=hp.attn_implementation,
            trainable_layers=hp.get("trainable_layers"),
        )
        model.train()  # from_pretrained returns eval mode; dropout belongs in fine-tuning
        if hp.gradient_checkpointing:
            # Non-reentrant: gradients then reach LoRA weights even though the frozen inputs need none.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    finite_advice = "lower model.learning_rate, or clip gradients (trainer.gradient_clip_val)."
    """What a run that turned non-finite should change."""

    def check_loss(self, loss: torch.Tensor) -> None:
        """Stop at a nan or inf training loss (called by the stages' ``training_step``)."""
        check_finite_loss(loss, f"{type(self).__name__} at step {self.global_step}", self.finite_advice)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        where = f"{type(self).__name__} after optimizer step {self.global_step + 1}"
        check_finite(self.parameters(), where, self.finite_advice)

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

    def export_model(self) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        return self.model, self.tokenizer


def merged(model: nn.Module) -> nn.Module:
    """A copy-free view of ``model`` without LoRA wrappers: adapters merged into the base weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def _full_precision_copy(model) -> nn.Module:
    """A peft model like ``model`` whose base is re-read in full precision from the checkpoint it was loaded from.

    Merging into a quantised base would round the update back onto the 4- / 8-bit grid; merging into the original
    weights gives the model QLoRA actually trained (Dettmers et al. 2023, §3).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(base).from_pretrained(config._name_or_path, config=config, dtype="auto")
    adapter = model.active_adapter
    clone = get_peft_model(fresh, copy.deepcopy(model.peft_config[adapter]))
    set_peft_model_state_dict(clone, get_peft_model_state_dict(model, adapter_name=adapter))
    return clone


def plain_copy(model: nn.Module) -> nn.Module:
    """``model`` as plain transformers saves it: a LoRA model merged into a copy (a QLoRA model into its base re-read
    in full precision, see ``_full_precision_copy``), any other model itself. A quantised model without LoRA has
    nothing trained and is refused."""
    from peft import PeftModel

    if is_quantised(model):
        if not isinstance(model, PeftModel):
            raise ValueError("export_pretrained: a quantised model without LoRA is frozen; export its source instead.")
        return _full_precision_copy(model).merge_and_unload()
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def export_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str | Path) -> Path:
    """Save a checkpoint that loads with plain ``transformers`` ``from_pretrained`` (LoRA merged into a copy).

    A LoRA model on a quantised base (QLoRA) is merged into its base re-read in full precision, so the export is a
    plain float checkpoint. A quantised model without LoRA has nothing trained and cannot be exported.
    """
    path = Path(path)
    model = plain_copy(model)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


CRITIC_FOLDER = "critic"
"""The subfolder of an exported model that holds its critic (``Exportable.export_critic``)."""


def export_module(module: Any, path: str | Path, critic: bool = True) -> Path:
    """Save ``module.export_model()`` to ``path`` with ``export_pretrained``, the module's ``export_extras(path)``
    when it has them and, with ``critic``, its ``export_critic()`` (when it has one) to ``path/critic`` with the same
    tokenizer; returns ``path``."""
    model, tokenizer = module.export_model()
    path = export_pretrained(model, tokenizer, path)
    if callable(getattr(module, "export_extras", None)):
        module.export_extras(path)
    critic_model = module.export_critic() if critic and callable(getattr(module, "export_critic", None)) else None
    if critic_model is not None:
        export_pretrained(critic_model, tokenizer, path / CRITIC_FOLDER)
    return path


def token_classifier(trunk: nn.Module, head: nn.Linear) -> nn.Module:
    """A plain transformers token classifier with one label: ``trunk``'s weights (a bare transformer such as
    ``LlamaModel``, LoRA merged into a copy) under a score layer holding ``head``'s weight and bias.

    Once saved, ``AutoModelForTokenClassification.from_pretrained`` loads it and its logits (B, T, 1) are ``head``
    applied to every position's last hidden state: the values of a critic built as trunk + scalar head. (A sequence
    classifier could not hold it: decoder sequence classifiers such as Llama's have a score layer without a bias.)
    Its classifier dropout is 0, as the critic trained without dropout.
    """
    from transformers import AutoModelForTokenClassification

    trunk = plain_copy(trunk)
    config = copy.deepcopy(trunk.config)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    config.architectures = None  # save_pretrained writes the classifier's
    model = AutoModelForTokenClassification.from_config(config, dtype=trunk.dtype)
    missing, _ = model.base_model.load_state_dict(trunk.state_dict(), strict=False)
    if missing:
        raise ValueError(
            f"token_classifier: {type(trunk).__name__} has no weights for {len(missing)} of the trunk parameters of "
            f"{type(model).__name__} (first: {missing[:3]}); pass the bare transformer (AutoModel) of its architecture."
        )
    scores = [child for child in model.children() if isinstance(child, nn.Linear) and child.out_features == 1]
    if len(scores) != 1 or (head.bias is not None and scores[0].bias is None):
        raise ValueError(f"token_classifier: {type(model).__name__} has no one-label score layer with a bias.")
    with torch.no_grad():
        scores[0].weight.copy_(head.weight)
        if scores[0].bias is not None:
            scores[0].bias.copy_(head.bias if head.bias is not None else torch.zeros_like(scores[0].bias))
    return model.eval()
