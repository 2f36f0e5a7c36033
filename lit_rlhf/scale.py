"""What the stage modules need to stay correct under Lightning's DDP and FSDP strategies (see docs/scaling.md)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDP
from torch import nn


def strategy_model(module: L.LightningModule) -> nn.Module | None:
    """The module as the strategy wrapped it (``DistributedDataParallel``, ``FullyShardedDataParallel``, ...); None
    outside a Trainer."""
    trainer = module._trainer
    return None if trainer is None else trainer.strategy.model


def fsdp_root(module: L.LightningModule) -> nn.Module | None:
    """The root ``FullyShardedDataParallel`` unit when the module runs under ``FSDPStrategy``, else None."""
    wrapped = strategy_model(module)
    if wrapped is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else None


def is_sharded(module: L.LightningModule) -> bool:
    """Whether the module's weights are split across processes (FSDP with more than one process)."""
    return fsdp_root(module) is not None and module.trainer.world_size > 1


def uses_grad_scaler(module: L.LightningModule) -> bool:
    """Whether the Trainer scales the loss (``16-mixed``): then a fused optimizer would unscale inside its kernel,
    after any clipping, so the stages build an unfused one."""
    trainer = module._trainer
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def clip_grad_norm(module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the global gradient norm to ``max_norm``, under FSDP and with fused optimizers too.

    Lightning refuses norm clipping under FSDP because ``torch.nn.utils.clip_grad_norm_`` would only see this
    rank's shard; the root FSDP unit's ``clip_grad_norm_`` all-reduces the shards' norms first. Its mixed-precision
    plugin also refuses any fused optimizer, for fear of a loss scaler; without one (``bf16-mixed``) the gradients
    are already unscaled and are clipped here as Lightning's plain precision plugin would.
    """
    root = fsdp_root(module)
    if root is not None:
        root.clip_grad_norm_(max_norm)
    elif optimizer.defaults.get("fused") and not uses_grad_scaler(module):
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def gather_flat(module: L.LightningModule, values: torch.Tensor) -> torch.Tensor:
    """``values`` of every process, concatenated flat (just ``values`` outside a Trainer).

    Shape: (N,) -> (world_size · N,).
    """
    return module.all_gather(values).flatten() if module._trainer is not None else values.flatten()


def mean_over_ranks(module: L.LightningModule, metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each scalar's mean over all processes (one all-reduce for all of them), as CPU float tensors.

    Equivalent to ``module.log(..., sync_dist=True)`` per key, which would cost one collective per metric.
    """
    keys = sorted(metrics)
    values = torch.stack([torch.as_tensor(metrics[k]).detach().float().to(module.device).reshape(()) for k in keys])
    if module._trainer is not None and module.trainer.world_size > 1:
        values = module.trainer.strategy.reduce(values, reduce_op="mean")
    return dict(zip(keys, values.cpu(), strict=True))


def float_mean_over_ranks(module: L.LightningModule, value: float) -> float:
    """``value`` averaged over all processes; exactly ``value`` (not rounded through a tensor) in one process."""
    if module._trainer is None or module.trainer.world_size == 1:
        return value
    return float(module.trainer.strategy.reduce(torch.tensor(value, device=module.device), reduce_op="mean"))


def skip_gradient_sync(module: L.LightningModule) -> AbstractContextManager:
    """A context in which DDP backward passes accumulate local gradients without the all-reduce.

    Gradient accumulation wraps every micro-batch but the last in it; the last backward then all-reduces the sum,
    which equals the sum of the all-reduced parts (the reduction is linear), at a fraction of the communication.
    Under FSDP every micro-batch still reduce-scatters: FSDP's ``no_sync`` would keep whole, unsharded gradients.
    """
    from torch.nn.parallel import DistributedDataParallel

    wrapped = strategy_model(module)
    if isinstance(wrapped, DistributedDataParallel) and module.trainer.world_size > 1:
        return wrapped.no_sync()
    return nullcontext()


def check_strategy(module: L.LightningModule, quantised: bool) -> None:
    """Fail on every rank before training when the strategy and the module's set-up cannot work together.

    Called from each module's ``setup`` hook, so the message comes before hours of training and no rank hangs.
    """
    trainer = module.trainer
    if not isinstance(trainer.strategy, _LightningFSDP):
        return
    if quantised:
        raise ValueError(
            "FSDPStrategy cannot shard bitsandbytes-quantised weights (load_in_8bit / load_in_4bit): use "
            "strategy: ddp for QLoRA, or drop the quantisation under FSDP."
        )


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(
            f"FSDP policy entry {path!r}: give the class's full import path, e.g. "
            "transformers.models.llama.modeling_llama.LlamaDecoderLayer."
        )
    import importlib

    return getattr(importlib.import_module(module), name)


class FSDPStrategy(_LightningFSDP):
    """Lightning's ``FSDPStrategy`` with its wrap and activation-checkpointing units named by import path in YAML.

    Lightning's own ``auto_wrap_policy`` takes a set of classes, which a config file cannot spell (jsonargparse drops
    it); here each unit is a class path such as ``transformers.models.llama.modeling_llama.LlamaDecoderLayer``.
    Every other argument goes to Lightning's ``FSDPStrategy`` (and on to torch's ``FullyShardedDataParallel``).

    Args:
        auto_wrap_policy: Classes whose instances become FSDP units. None: every transformers decoder / encoder
            layer (``transformers.modeling_layers.GradientCheckpointingLayer``), whatever the architecture.
        activation_checkpointing_policy: Classes whose activations are recomputed in the backward pass; None or
            empty turns activation checkpointing off.
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD`` (full shard inside a
            node, replicas across nodes) or ``NO_SHARD``.
        state_dict_type: ``full`` saves one checkpoint file gathered on rank 0 (what ``lit-rlhf export`` reads);
            ``sharded`` saves a folder of shards (faster; consolidate it before exporting).
        cpu_offload: Keep parameters and gradients in CPU memory between uses.
        kwargs: Further ``lightning.pytorch.strategies.FSDPStrategy`` arguments.
    """

    def __init__(
        self,
        auto_wrap_policy: list[str] | None = None,
        activation_checkpointing_policy: list[str] | None = None,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        if auto_wrap_policy is None:
            from transformers.modeling_layers import GradientCheckpointingLayer

            wrap = {GradientCheckpointingLayer}
        else:
            wrap = {_import_class(path) for path in auto_wrap_policy}
        checkpointing = {_import_class(path) for path in activation_checkpointing_policy or []}
        super().__init__(
            auto_wrap_policy=wrap,
            activation_checkpointing_policy=checkpointing or None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            **kwargs,
        )
