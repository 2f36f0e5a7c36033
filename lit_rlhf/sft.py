"""Stage 1: supervised fine-tuning of a causal LM on prompt → completion data, loss on completion tokens only."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.text import Perplexity

from lit_rlhf.finetuning import FineTuningModule, SchedulerName
from lit_rlhf.hparams import make_plain
from lit_rlhf.models import DType, LoraOptions, load_causal_lm, load_tokenizer


def completion_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed negative log-likelihood of the labelled tokens, and their count.

    Position t predicts token t+1; labels equal to -100 (prompt and padding) do not count.

    Shape: logits (B, T, V), labels (B, T) -> nll (B,), tokens (B,).
    """
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logprobs = torch.log_softmax(shifted_logits, dim=-1)
    token_lp = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(token_lp * mask).sum(-1), mask.sum(-1)


class SFTModule(FineTuningModule):
    """Supervised fine-tuning: causal-LM cross-entropy on the completion tokens, perplexity on val/test.

    Args:
        model: Bundled name, hub id or path of the causal LM to fine-tune.
        lora: LoRA adapter settings; None fine-tunes every weight.
        learning_rate: Peak learning rate of the default AdamW optimizer.
        weight_decay: Weight decay of the default AdamW optimizer.
        optimizer: Any optimizer factory, e.g. ``bitsandbytes.optim.AdamW8bit`` by ``class_path``; overrides
            ``learning_rate`` / ``weight_decay`` (set them in its ``init_args``).
        scheduler: Learning-rate schedule after warm-up.
        warmup_ratio: Share of all optimizer steps spent warming up linearly from zero.
        dtype: Weight dtype.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        load_in_8bit: Load the base weights in 8 bits (bitsandbytes LLM.int8) and train ``lora`` on top.
        load_in_4bit: Load the base weights in 4-bit NF4 and train ``lora`` on top (QLoRA, Dettmers et al. 2023).
            Either way the weights are placed on this process's device when loaded; the export merges the adapter
            into the base re-read in full precision.
        attn_implementation: transformers' attention kernel for the model(s) (``eager``, ``sdpa``, ...); None keeps
            transformers' default (``sdpa``). On a CPU ``eager`` trains faster at short lengths (bench/README.md: a
            MiniLM reward-model step 1.28 s against 1.54 s); its memory grows with the square of the length.
        trainable_layers: Train only the top this many transformer layers and what lies above them (the final norm,
            and the LM head unless it is tied to the input embedding, as SmolLM2's is: then it stays frozen, since
            training it would train the bottom of the model too). The embeddings and lower layers are frozen: no
            gradients, no optimizer state, and the backward pass stops at the lowest trained layer. With ``lora``,
            adapters go on those layers only. None, or the number of layers, trains everything.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lora: LoraOptions | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: SchedulerName = "cosine",
        warmup_ratio: float = 0.05,
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
        self.optimizer_factory = optimizer
        self.model = self.load_trainable(load_causal_lm, model, lora)
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.perplexity = torch.nn.ModuleDict({s: Perplexity(ignore_index=-100) for s in ("val", "test")})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shape: (B, T) -> logits (B, T, V)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        nll, tokens = completion_nll(logits, batch["labels"])
        # Mean over all completion tokens in the batch, so long completions weigh as much as their tokens.
        count = int(tokens.sum())
        return nll.sum() / max(count, 1), logits, count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, count = self._loss(batch)
        self.check_loss(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log("train/tokens", float(count), reduce_fx="sum", batch_size=len(batch["input_ids"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, logits, _ = self._loss(batch)
        self.perplexity[stage](logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log(f"{stage}/loss", loss, batch_size=len(batch["input_ids"]), sync_dist=True)
        self.log(f"{stage}/perplexity", self.perplexity[stage], batch_size=len(batch["input_ids"]), prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-example completion NLL and token count."""
        nll, tokens = completion_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        return {"nll": nll, "tokens": tokens}
