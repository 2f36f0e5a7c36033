"""Offline preference optimisation: ``DPOModule`` trains a causal LM directly on preference pairs with DPO or one of
its variants (IPO, cDPO, robust DPO, SimPO), against a reference that is the policy with its LoRA adapter off, a frozen
copy, or log-probs computed once before training."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_rlhf.data.encoding import IGNORE_INDEX
from lit_rlhf.finetuning import FineTuningModule, SchedulerName
from lit_rlhf.hparams import make_plain
from lit_rlhf.models import DType, LoraOptions, load_causal_lm, load_tokenizer

PreferenceLoss = Literal["sigmoid", "ipo", "robust", "simpo"]
"""The loss on a pair's implicit-reward difference; see :func:`preference_loss`."""


def response_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each row's labelled tokens under ``model``, and their count.

    Only the positions from the batch's first labelled token on get logits (``logits_to_keep``): the prompt costs no
    LM head and no softmax over the vocabulary, the largest tensors of a DPO step. Position t predicts token t + 1.

    Shape: input_ids, attention_mask, labels (B, T) -> log-probs (B,) float32, token counts (B,) long.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    length = targets.shape[1]
    first = int(torch.where(mask.any(0))[0][0]) if mask.any() else length - 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=length + 1 - first, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets, mask = targets[:, first:], mask[:, first:]
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def preference_loss(
    chosen: Tensor,
    rejected: Tensor,
    beta: float,
    loss: PreferenceLoss = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> Tensor:
    """Per-pair loss on the implicit rewards of the chosen and the rejected response.

    ``chosen`` / ``rejected`` are h = log π(y|x) − log π_ref(y|x) for the DPO family, and the length-normalised
    log π(y|x) / |y| for SimPO, which has no reference. With z = β·(h_c − h_r), ε = ``label_smoothing``:

    - ``sigmoid``: −(1 − ε)·log σ(z) − ε·log σ(−z). ε = 0 is DPO (Rafailov et al. 2023, eq. 7); ε > 0 is
      conservative DPO (cDPO, Mitchell 2023), for labels flipped with probability ε.
    - ``robust``: (−(1 − ε)·log σ(z) + ε·log σ(−z)) / (1 − 2ε), the unbiased loss under label noise ε of
      Chowdhury et al. 2024 (rDPO, eq. 7); needs ε < 0.5.
    - ``ipo``: (h_c − h_r − 1/(2β))², IPO (Azar et al. 2023, eq. 17), on summed log-probs as in the paper.
    - ``simpo``: as ``sigmoid`` with z = β·(h_c − h_r) − γ, γ = ``simpo_gamma`` the target margin (Meng et al. 2024,
      eq. 6).

    Shape: chosen, rejected (B,) -> (B,).
    """
    difference = chosen - rejected
    if loss == "ipo":
        return (difference - 1 / (2 * beta)) ** 2
    z = beta * difference - (simpo_gamma if loss == "simpo" else 0.0)
    if loss == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
            1 - 2 * label_smoothing
        )
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def check_dpo_arguments(arguments: dict[str, Any], prefix: str = "model.") -> None:
    """Fail on ``DPOModule`` arguments that cannot work, before any weights load; errors name ``{prefix}{argument}``."""
    loss, smoothing = arguments["loss"], arguments["label_smoothing"]
    if loss not in ("sigmoid", "ipo", "robust", "simpo"):
        raise ValueError(f"{prefix}loss must be one of sigmoid, ipo, robust, simpo; got {loss!r}.")
    if not arguments["beta"] > 0:
        raise ValueError(f"{prefix}beta must be > 0, got {arguments['beta']}.")
    if not 0.0 <= smoothing < (0.5 if loss == "robust" else 1.0):
        bound = "0.5 for the robust loss" if loss == "robust" else "1"
        raise ValueError(f"{prefix}label_smoothing must be in [0, {bound}), got {smoothing}.")
    if loss == "simpo" and (arguments["reference_model"] is not None or arguments["precompute_reference"]):
        raise ValueError(
            f"{prefix}loss 'simpo' uses no reference model: leave {prefix}reference_model None and "
            f"{prefix}precompute_reference false."
        )


class DPOModule(FineTuningModule):
    """Direct preference optimisation of a causal LM on ``PreferenceDataModule(encoding="causal_lm")`` batches.

    Each step scores the chosen and the rejected response of every pair in one forward (the two sides stacked), and
    the reference in one more, without gradients; the loss is :func:`preference_loss`. Logged per stage (``train``,
    ``val``, ``test``): ``loss``; ``rewards/chosen`` and ``rewards/rejected``, the implicit rewards β·h; their mean
    difference ``rewards/margin``; ``rewards/accuracy``, the share of pairs whose chosen response gets the higher
    implicit reward; and ``logps/chosen`` / ``logps/rejected``, the policy's summed log-probs.

    Args:
        model: Bundled name, hub id or path of the causal LM to train (usually an SFT model).
        lora: LoRA adapter settings; None trains every weight (or the top ``trainable_layers``).
        loss: ``sigmoid`` (DPO, or cDPO with ``label_smoothing``), ``robust`` (rDPO), ``ipo`` or ``simpo``; see
            :func:`preference_loss`.
        beta: β, the strength of the implicit KL penalty to the reference (DPO 0.1; SimPO uses 2–2.5).
        label_smoothing: ε, the assumed share of flipped labels (``sigmoid``, ``robust``, ``simpo``).
        simpo_gamma: SimPO's target reward margin γ.
        reference_model: Bundled name, hub id or path of the reference; None: the initial ``model``, which with
            ``lora`` is the policy with its adapter off (no second copy), and otherwise a frozen copy.
        precompute_reference: Compute the reference's log-probs of every training and validation pair once, before
            the first step, and keep them (in checkpoints too): each step then costs the policy's forward and
            backward only. Other splits (test) still run the reference.
        learning_rate: Peak learning rate of the default AdamW optimizer.
        weight_decay: Weight decay of the default AdamW optimizer.
        optimizer: Any optimizer factory, e.g. ``bitsandbytes.optim.AdamW8bit`` by ``class_path``; overrides
            ``learning_rate`` / ``weight_decay`` (set them in its ``init_args``).
        scheduler: Learning-rate schedule after warm-up.
        warmup_ratio: Share of all optimizer steps spent warming up linearly from zero.
        disable_dropout: Set every dropout probability to 0, so that the log-probs of policy and reference are
            deterministic and the implicit rewards measure the weights, not the dropout mask.
        dtype: Weight dtype (of the reference copy too).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        load_in_8bit: Load the base weights in 8 bits (bitsandbytes LLM.int8) and train ``lora`` on top.
        load_in_4bit: Load the base weights in 4-bit NF4 and train ``lora`` on top (QLoRA, Dettmers et al. 2023).
        attn_implementation: transformers' attention kernel (``eager``, ``sdpa``, ...); None keeps its default.
        trainable_layers: Train only the top this many transformer layers and what lies above them (see
            ``SFTModule``); the rest is frozen.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lora: LoraOptions | None = None,
        loss: PreferenceLoss = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        reference_model: str | None = None,
        precompute_reference: bool = False,
        learning_rate: float = 5e-7,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: SchedulerName = "linear",
        warmup_ratio: float = 0.1,
        disable_dropout: bool = True,
        dtype: DType = "float32",
        gradient_checkpointing: bool = False,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        attn_implementation: str | None = None,
        trainable_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        make_plain(self)
        check_dpo_arguments(self.hparams)
        self.optimizer_factory = optimizer
        self.model = self.load_trainable(load_causal_lm, model, lora)
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.reference: nn.Module | None = None
        if loss != "simpo" and (reference_model is not None or lora is None):
            self.reference = load_causal_lm(
                reference_model or model, dtype=dtype, attn_implementation=attn_implementation
            ).eval()
            self.reference.requires_grad_(False)
        if disable_dropout:
            for module in self.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        self.reference_logps: dict[str, Tensor] = {}
        """Cached reference log-probs per split, ``(N, 2)`` (chosen, rejected) by example index; nan: not yet
        computed."""

    # -----------------------------------------------------------------------------------------------------------------
    # Log-probs

    @staticmethod
    def _stacked(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if "chosen_labels" not in batch:
            raise ValueError(
                "DPOModule needs causal-LM preference batches (with chosen_labels / rejected_labels): use "
                "PreferenceDataModule with encoding: causal_lm (data.encoding in a config; lit-rlhf dpo sets it)."
            )
        return tuple(
            torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")
        )  # type: ignore[return-value]

    def _reference_logps(self, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """The reference's summed log-probs of stacked sides (``_stacked``), without gradients. Shape: (2B, T) ->
        (2B,)."""
        with torch.no_grad():
            if self.reference is not None:
                return response_logprobs(self.reference, ids, mask, labels)[0]
            with self.model.disable_adapter():
                return response_logprobs(self.model, ids, mask, labels)[0]

    def _reference(self, batch: dict[str, Tensor], split: str, stacked: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Reference log-probs of the batch: from the cache of ``split`` when ``precompute`` filled it for every pair
        of the batch, else computed on ``stacked``. Shape: (2B,)."""
        cache = self.reference_logps.get(split)
        if cache is not None and "index" in batch:
            rows = cache[batch["index"].cpu()]
            if not rows.isnan().any():
                return rows.T.reshape(-1).to(self.device)
        return self._reference_logps(*stacked)

    def precompute(self, loader: Any, split: str) -> Tensor:
        """Fill the cache of ``split`` with the reference's log-probs of every pair that ``loader`` yields."""
        from tqdm.auto import tqdm

        size = len(loader.dataset)
        cache = self.reference_logps.get(split)
        if cache is None or len(cache) != size:
            cache = torch.full((size, 2), float("nan"))
        missing = cache.isnan().any(-1)
        if missing.any():
            was_training = self.training
            self.eval()
            for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=not self.trainer.is_global_zero):
                if not missing[batch["index"]].any():
                    continue
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                logps = self._reference_logps(*self._stacked(batch)).float().cpu()
                cache[batch["index"].cpu()] = logps.reshape(2, -1).T
            self.train(was_training)
        self.reference_logps[split] = cache
        return cache

    def on_fit_start(self) -> None:
        if not self.hparams.precompute_reference:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("precompute_reference needs a data module (PreferenceDataModule) to read the pairs from.")
        self.precompute(datamodule.train_dataloader(), "train")
        val = datamodule.val_dataloader()
        if val:
            self.precompute(val, "val")

    # -----------------------------------------------------------------------------------------------------------------
    # Steps

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        hp = self.hparams
        stacked = self._stacked(batch)
        logps, tokens = response_logprobs(self.model, *stacked)
        pairs = len(logps) // 2
        # SimPO: the mean log-prob per token, no reference; the DPO family: the log-ratio to the reference.
        simpo = hp.loss == "simpo"
        scores = logps / tokens.clamp(min=1) if simpo else logps - self._reference(batch, split, stacked)
        chosen, rejected = scores[:pairs], scores[pairs:]
        losses = preference_loss(chosen, rejected, hp.beta, hp.loss, hp.label_smoothing, hp.simpo_gamma)
        loss = losses.mean()
        chosen_rewards, rejected_rewards = hp.beta * chosen.detach(), hp.beta * rejected.detach()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": logps[:pairs].detach().mean(),
            "logps/rejected": logps[pairs:].detach().mean(),
        }
        sync = split != "train"
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}",
                value,
                batch_size=pairs,
                prog_bar=name in ("loss", "rewards/accuracy"),
                sync_dist=sync,
            )
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.check_loss(loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints: the frozen reference is rebuilt from its source, not saved; the cached log-probs are saved.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        checkpoint["dpo_reference_logps"] = dict(self.reference_logps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            state = checkpoint["state_dict"]
            for key, value in self.reference.state_dict().items():
                state.setdefault(f"reference.{key}", value)
        self.reference_logps = dict(checkpoint.get("dpo_reference_logps", {}))
