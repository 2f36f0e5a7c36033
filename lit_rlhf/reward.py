"""Stage 2: a reward model trained on preference pairs or K-wise rankings with the Bradley–Terry loss (or the
Plackett–Luce likelihood), and its scoring wrapper."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy
from transformers import AutoTokenizer

from lit_rlhf.data.encoding import encode_prompt_response, pad_right
from lit_rlhf.finetuning import FineTuningModule, SchedulerName
from lit_rlhf.hparams import Configurable, make_plain
from lit_rlhf.models import (
    DType,
    LoraOptions,
    is_quantised,
    load_sequence_classifier,
    load_tokenizer,
    resolve,
)
from lit_rlhf.ranking import pair_differences, pairwise_ranking_loss, plackett_luce_loss, ranking_centering

RankingLoss = Literal["pairwise", "plackett_luce"]
"""How a K-wise ranking is scored: see :func:`~lit_rlhf.ranking.pairwise_ranking_loss` and
:func:`~lit_rlhf.ranking.plackett_luce_loss`."""


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Negative log-likelihood of the preferences under Bradley–Terry, ``-log σ(r_c - r_r - m)``, batch mean.

    With ``margin`` the chosen reward must beat the rejected one by that much (Llama 2, Touvron et al. 2023, eq. 2).
    ``center_coef`` adds ``coef · mean((r_c + r_r)^2)``, which pins the reward's mean near zero (Eisenstein et al. 2023)
    so that the scale the RL stage sees does not drift.

    Shape: chosen (B,), rejected (B,), margin (B,) or None -> scalar.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


class RewardModelModule(FineTuningModule):
    """Train a scalar reward model on preference pairs (chosen vs rejected) with the Bradley–Terry loss, or on K-wise
    rankings (batches of ``PreferenceDataModule`` with rankings), each response scored once per batch.

    Accuracy (``train/accuracy``, ``val/accuracy``) is the share of comparisons whose better response gets the higher
    reward, over the pairs of a batch or every comparison of its rankings; ``{val,test}/margin`` is their mean reward
    gap.

    Args:
        backbone: Bundled name, hub id or path of the trunk; any ``AutoModelForSequenceClassification`` model
            (one label) or a causal LM, whose trunk gets a fresh linear score head.
        lora: LoRA adapter on the backbone (the score head is trained in full); None trains every weight.
        learning_rate: Peak learning rate of the default AdamW optimizer.
        weight_decay: Weight decay of the default AdamW optimizer.
        optimizer: Any optimizer factory, e.g. ``bitsandbytes.optim.AdamW8bit`` by ``class_path``; overrides
            ``learning_rate`` / ``weight_decay`` (set them in its ``init_args``).
        scheduler: Learning-rate schedule after warm-up.
        warmup_ratio: Share of all optimizer steps spent warming up linearly from zero.
        center_rewards_coefficient: Weight of the reward-centering term ``mean((r_c + r_r)^2)`` (over every pair of a
            ranking's responses); 0 turns it off.
        ranking_loss: Loss of ranking batches: ``pairwise``, InstructGPT's Bradley–Terry loss averaged over each
            prompt's comparisons, or ``plackett_luce``, the likelihood of the whole ranking. Both are the Bradley–Terry
            loss on a pair; pair batches ignore this.
        dtype: Weight dtype of the backbone.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        load_in_8bit: Load the base weights in 8 bits (bitsandbytes LLM.int8) and train ``lora`` on top.
        load_in_4bit: Load the base weights in 4-bit NF4 and train ``lora`` on top (QLoRA, Dettmers et al. 2023).
            Either way the weights are placed on this process's device when loaded; the export merges the adapter
            into the base re-read in full precision.
        attn_implementation: transformers' attention kernel for the model(s) (``eager``, ``sdpa``, ...); None keeps
            transformers' default (``sdpa``). On a CPU ``eager`` trains faster at short lengths (bench/README.md: a
            MiniLM reward-model step 1.28 s against 1.54 s); its memory grows with the square of the length.
        trainable_layers: Train only the top this many transformer layers (decoder or encoder) and what lies above
            them (final norm or pooler, and the score head); the embeddings and lower layers are frozen: no gradients,
            no optimizer state, and the backward pass stops at the lowest trained layer. With ``lora``, adapters go
            on those layers only (the score head still trains in full). None, or the number of layers, trains all.
    """

    def __init__(
        self,
        backbone: str = "all-minilm-l6-v2",
        lora: LoraOptions | None = None,
        learning_rate: float = 3e-5,
        weight_decay: float = 0.01,
        optimizer: OptimizerCallable | None = None,
        scheduler: SchedulerName = "linear",
        warmup_ratio: float = 0.1,
        center_rewards_coefficient: float = 0.0,
        ranking_loss: RankingLoss = "pairwise",
        dtype: DType = "float32",
        gradient_checkpointing: bool = False,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        attn_implementation: str | None = None,
        trainable_layers: int | None = None,
    ) -> None:
        super().__init__()
        if ranking_loss not in ("pairwise", "plackett_luce"):
            raise ValueError(f"ranking_loss must be 'pairwise' or 'plackett_luce', got {ranking_loss!r}.")
        self.save_hyperparameters(ignore=["optimizer"])
        make_plain(self)
        self.optimizer_factory = optimizer
        if lora is not None and not lora.modules_to_save:
            lora.modules_to_save = ["score", "classifier"]
        self.model = self.load_trainable(load_sequence_classifier, backbone, lora)
        self.tokenizer = load_tokenizer(backbone, padding_side="right")
        self.accuracy = torch.nn.ModuleDict({s: BinaryAccuracy() for s in ("val", "test")})
        self.mean_margin = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shape: (B, T) ids and mask -> (B,) rewards."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def _pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of the chosen and the rejected sides in one forward: half the kernel launches.

        Shape: batch ``{chosen,rejected}_{input_ids,attention_mask}`` (B, T) -> (B,) chosen and (B,) rejected rewards.

        Raises:
            ValueError: the two sides have different widths (``PreferenceCollator`` pads both to one).
        """
        chosen_ids, rejected_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
        if chosen_ids.shape[1] != rejected_ids.shape[1]:
            raise ValueError(
                f"Chosen and rejected ids must be padded to one width to be scored in one forward, got "
                f"{chosen_ids.shape[1]} and {rejected_ids.shape[1]}; batch them with "
                "lit_rlhf.data.encoding.PreferenceCollator."
            )
        ids = torch.cat([chosen_ids, rejected_ids])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        rewards = self(ids, mask)
        return rewards[: len(chosen_ids)], rewards[len(chosen_ids) :]

    def _ranking_rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards of every response of a ranking batch in one forward, put back in their slots (0 in empty ones).

        Shape: batch ``input_ids`` / ``attention_mask`` (N, T), ``response_mask`` (B, K) -> (B, K).
        """
        rewards = self(batch["input_ids"], batch["attention_mask"])
        mask = batch["response_mask"]
        return rewards.new_zeros(mask.shape).masked_scatter(mask, rewards)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of a pair or ranking batch and the reward gap ``r_better − r_worse`` of each of its comparisons.

        Shape: -> scalar and (P,), P the number of comparisons (B for pairs).
        """
        coef = self.hparams.center_rewards_coefficient
        if "response_mask" not in batch:
            chosen, rejected = self._pair_rewards(batch)
            return bradley_terry_loss(chosen, rejected, batch.get("margin"), coef), chosen - rejected
        rewards, mask, scores = self._ranking_rewards(batch), batch["response_mask"], batch["scores"]
        margin = batch.get("margin")
        if self.hparams.ranking_loss == "pairwise":
            loss = pairwise_ranking_loss(rewards, scores, mask, margin)
        else:
            if margin is not None and bool(margin.any()):
                raise ValueError(
                    "ranking_loss=plackett_luce has no margin, but this batch holds pairs with a margin (read among "
                    "rankings); use ranking_loss=pairwise, or drop the margin column."
                )
            loss = plackett_luce_loss(rewards, scores, mask)
        if coef:
            loss = loss + coef * ranking_centering(rewards, mask)
        return loss, pair_differences(rewards, scores, mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, diff = self._loss(batch)
        self.check_loss(loss)
        rows = _rows(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log("train/accuracy", (diff > 0).float().mean(), prog_bar=True, batch_size=rows)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, diff = self._loss(batch)
        rows = _rows(batch)
        # A tie (diff == 0) counts as wrong: σ(0) = 0.5 is not above the 0.5 threshold.
        self.accuracy[stage](torch.sigmoid(diff), torch.ones_like(diff, dtype=torch.long))
        self.mean_margin[stage](diff)
        self.log(f"{stage}/loss", loss, batch_size=rows, sync_dist=True)
        self.log(f"{stage}/accuracy", self.accuracy[stage], batch_size=rows, prog_bar=True)
        self.log(f"{stage}/margin", self.mean_margin[stage], batch_size=rows)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Pairs: ``chosen`` and ``rejected`` rewards (B,); rankings: ``rewards`` (B, K), NaN in empty slots."""
        if "response_mask" in batch:
            return {"rewards": self._ranking_rewards(batch).masked_fill(~batch["response_mask"], float("nan"))}
        chosen, rejected = self._pair_rewards(batch)
        return {"chosen": chosen, "rejected": rejected}


def _rows(batch: dict[str, torch.Tensor]) -> int:
    """Pairs or rankings in a batch (what the logged means average over)."""
    return len(batch["response_mask"] if "response_mask" in batch else batch["chosen_input_ids"])


class RewardModel(Configurable):
    """Score (prompt, completion) pairs with a trained reward model: the learned reward of the RL stage.

    A plain callable ``(prompts, completions) -> Tensor (N,)``, batched and without gradients. It keeps its own
    tokenizer, so it need not share the policy's vocabulary: text is the interface.

    Args:
        path: A folder saved by ``RewardModelModule.export`` (or any one-label sequence classifier), a bundled
            name or a hub id; a Lightning ``.ckpt`` of ``RewardModelModule`` works too.
        batch_size: Texts scored per forward pass.
        max_length: Token budget per (prompt, completion); the prompt is cut from the left.
        device: Where to run the model; defaults to CUDA when available.
        dtype: Weight dtype for inference (the compute dtype of quantised weights).
        load_in_8bit: Load an exported (folder or hub) reward model in 8 bits (bitsandbytes LLM.int8).
        load_in_4bit: Load it in 4-bit NF4.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        max_length: int = 512,
        device: str | None = None,
        dtype: DType = "float32",
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.max_length = max_length
        if str(path).endswith(".ckpt"):
            if load_in_8bit or load_in_4bit:
                raise ValueError("RewardModel: quantised loading needs an exported folder, not a Lightning .ckpt.")
            module = RewardModelModule.load_from_checkpoint(path, map_location="cpu")
            model, tokenizer = module.model, module.tokenizer
            from lit_rlhf.finetuning import merged

            model = merged(model)
        else:
            local = resolve(path)
            model = load_sequence_classifier(
                local, dtype=dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, device=self.device
            )
            tokenizer = AutoTokenizer.from_pretrained(local)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # as in training
        self.model = (model if is_quantised(model) else model.to(self.device)).eval()
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"RewardModel got {len(prompts)} prompts but {len(completions)} completions.")
        encoded = [
            encode_prompt_response(self.tokenizer, p, c, self.max_length)
            for p, c in zip(prompts, completions, strict=True)
        ]
        # Score in length order so each batch pads to similar lengths, then put the scores back.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = torch.empty(len(encoded), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = pad_right([encoded[i] for i in idx], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores[idx] = logits.squeeze(-1).float().cpu()
        return scores
