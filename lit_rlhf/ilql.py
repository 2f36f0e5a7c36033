"""Offline RL stage: ILQL (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language Q
Learning") on scored responses. Q and V heads learn on the LM's last hidden state while the LM keeps learning the
data; decoding perturbs the LM by β·(Q − V) (``make_ilql_processor``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_rlhf.data.encoding import IGNORE_INDEX
from lit_rlhf.finetuning import FineTuningModule, SchedulerName
from lit_rlhf.hparams import make_plain
from lit_rlhf.ilql_decoding import ILQLLogitsProcessor, MakeProcessor, make_ilql_processor
from lit_rlhf.ilql_heads import QVHeads, load_heads, save_heads
from lit_rlhf.ilql_losses import cql_loss, expectile_loss, lm_loss, polyak_update, q_loss, terminal_rewards
from lit_rlhf.models import DType, LoraOptions, is_quantised, load_causal_lm, load_tokenizer
from lit_rlhf.rl.advantages import masked_mean

__all__ = ["ILQLLogitsProcessor", "ILQLModule", "ILQLTerms", "QVHeads", "load_heads", "make_ilql_processor"]


class ILQLTerms(NamedTuple):
    """The loss terms of one batch and the mean estimates, each a scalar tensor."""

    q: Tensor
    """TD loss of the Q heads (``ilql_losses.q_loss``)."""
    v: Tensor
    """Expectile loss of the V head (``ilql_losses.expectile_loss``)."""
    cql: Tensor
    """Conservative cross-entropy of the Q heads (``ilql_losses.cql_loss``), before ``cql_scale``."""
    awac: Tensor
    """The LM's NLL of the response tokens (``ilql_losses.lm_loss``), before ``awac_scale``."""
    mean_q: Tensor
    """Mean over heads and response tokens of Q(s_t, a_t)."""
    mean_v: Tensor
    """Mean over response tokens of V(s_t)."""


class ILQLModule(FineTuningModule):
    """ILQL on ``ScoredDataModule`` batches: every response token is an action, the response's reward is paid on its
    last token. Loss = q + v + ``cql_scale``·cql + ``awac_scale``·awac (see :class:`ILQLTerms`); after every
    ``target_sync_every`` optimizer steps the target Q heads move a share ``alpha`` towards the Q heads. The defaults
    of ``tau``, ``gamma``, ``cql_scale``, ``awac_scale``, ``alpha``, ``target_sync_every``, ``two_qs`` and ``beta`` are
    trlx's (``default_ilql_config``, its decoding ``beta`` of 1).

    Logged: ``{train,val,test}/loss``, ``.../loss/q``, ``.../loss/v``, ``.../loss/cql``, ``.../loss/awac``,
    ``.../q`` (mean Q of the tokens taken) and ``.../v`` (mean V). The export is the LM as a plain transformers
    folder with the target Q heads and the V head beside it (``ilql_heads.safetensors``, ``ilql_heads.json`` holding
    ``beta``); ``make_ilql_processor(folder)`` decodes with them.

    Args:
        model: Bundled name, hub id or path of the causal LM to fine-tune.
        lora: LoRA adapter settings; None fine-tunes every weight. The heads always train in full.
        learning_rate: Peak learning rate of the default AdamW optimizer (trlx's ILQL default: 5e-5).
        weight_decay: Weight decay of the default AdamW optimizer.
        optimizer: Any optimizer factory, e.g. ``bitsandbytes.optim.AdamW8bit`` by ``class_path``; overrides
            ``learning_rate`` / ``weight_decay`` (set them in its ``init_args``).
        scheduler: Learning-rate schedule after warm-up.
        warmup_ratio: Share of all optimizer steps spent warming up linearly from zero.
        dtype: Weight dtype of the LM (the heads stay float32).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        load_in_8bit: Load the base weights in 8 bits (bitsandbytes LLM.int8) and train ``lora`` on top.
        load_in_4bit: Load the base weights in 4-bit NF4 and train ``lora`` on top (QLoRA, Dettmers et al. 2023).
        attn_implementation: transformers' attention kernel (``eager``, ``sdpa``, ...); None keeps its default.
        trainable_layers: Train only the top this many transformer layers of the LM and what lies above them (see
            ``SFTModule``); None trains everything.
        tau: Expectile of the V loss, in (0, 1): 0.5 fits the mean of Q̂ over the data's tokens, towards 1 their max.
        gamma: Discount per token, in (0, 1].
        cql_scale: Weight of the conservative (CQL) term.
        awac_scale: Weight of the LM's NLL on the responses.
        alpha: Polyak rate of the target Q heads, in (0, 1]: target ← (1 − alpha)·target + alpha·Q at each sync.
        target_sync_every: Optimizer steps between target syncs.
        two_qs: Two Q heads, whose minimum the V loss and decoding use (against over-estimation); False: one.
        beta: Decoding's perturbation scale, saved with the exported heads (``make_ilql_processor`` default).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lora: LoraOptions | None = None,
        learning_rate: float = 5e-5,
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
        tau: float = 0.7,
        gamma: float = 0.99,
        cql_scale: float = 0.1,
        awac_scale: float = 1.0,
        alpha: float = 0.001,
        target_sync_every: int = 5,
        two_qs: bool = True,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        check_ilql_arguments(tau, gamma, cql_scale, awac_scale, alpha, target_sync_every, beta)
        self.save_hyperparameters(ignore=["optimizer"])
        make_plain(self)
        self.optimizer_factory = optimizer
        self.model = self.load_trainable(load_causal_lm, model, lora)
        self.tokenizer = load_tokenizer(model, padding_side="right")
        vocab = self.model.get_output_embeddings().out_features
        self.heads = QVHeads.create(self.model.config.hidden_size, vocab, 2 if two_qs else 1)
        self.target_q_heads = copy.deepcopy(self.heads.q_heads).requires_grad_(False)
        if is_quantised(self.model):  # quantised weights are placed at load time; the heads join them
            self.heads.to(self.model.device)
            self.target_q_heads.to(self.model.device)

    def decoding_heads(self) -> QVHeads:
        """The heads decoding reads: the target Q heads (the estimate the V head is fitted to, as trlx decodes) and
        the V head, sharing this module's weights."""
        return QVHeads(self.target_q_heads, self.heads.v_head)

    def make_processor(self, beta: float | None = None) -> MakeProcessor:
        """``make_ilql_processor(self, beta)``: ILQL decoding with this module's LM and heads."""
        return make_ilql_processor(self, beta)

    def terms(self, batch: dict[str, Tensor]) -> ILQLTerms:
        """The loss terms of a ``ScoredDataModule`` batch: position t's hidden state is the state s_t in which the
        token at t + 1 (the action a_t) was taken; response tokens are those with a label."""
        input_ids = batch["input_ids"]
        out = self.model(
            input_ids=input_ids, attention_mask=batch["attention_mask"], output_hidden_states=True, use_cache=False
        )
        hidden = out.hidden_states[-1]
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        rewards, done = terminal_rewards(batch["rewards"].float(), mask.float())
        values = self.heads.values(hidden)  # V(s_t) and, one position on, V(s_{t+1})
        # Only response tokens are actions: the vocabulary-sized Q heads run on those N positions alone, not on the
        # prompt and padding (most of an hh-rlhf sequence), which saves most of the heads' cost.
        states, actions = hidden[:, :-1][mask], input_ids[:, 1:][mask]  # (N, H), (N,)
        v, next_v, rewards, done = values[:, :-1][mask], values[:, 1:][mask], rewards[mask], done[mask]
        every = torch.ones_like(v)
        q_values = self.heads.q_values(states)  # (K, N, V)
        q = q_values.gather(-1, actions.expand(q_values.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            target_q = self.decoding_heads().action_values(states, actions)
        hp = self.hparams
        return ILQLTerms(
            q=q_loss(q, rewards, next_v, done, every, hp.gamma),
            v=expectile_loss(target_q, v, every, hp.tau),
            cql=cql_loss(q_values, actions, every),
            awac=lm_loss(out.logits[:, :-1], input_ids[:, 1:], mask.float()),
            mean_q=masked_mean(q.detach().mean(0), every),
            mean_v=masked_mean(v.detach(), every),
        )

    def loss(self, terms: ILQLTerms) -> Tensor:
        """q + v + ``cql_scale``·cql + ``awac_scale``·awac."""
        return terms.q + terms.v + self.hparams.cql_scale * terms.cql + self.hparams.awac_scale * terms.awac

    def _log(self, stage: str, terms: ILQLTerms, loss: Tensor, rows: int) -> None:
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=rows, sync_dist=sync)
        for name in ("q", "v", "cql", "awac"):
            self.log(f"{stage}/loss/{name}", getattr(terms, name), batch_size=rows, sync_dist=sync)
        self.log(f"{stage}/q", terms.mean_q, batch_size=rows, sync_dist=sync)
        self.log(f"{stage}/v", terms.mean_v, batch_size=rows, sync_dist=sync)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.terms(batch)
        loss = self.loss(terms)
        self.check_loss(loss)
        self._log("train", terms, loss, len(batch["input_ids"]))
        return loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        terms = self.terms(batch)
        self._log(stage, terms, self.loss(terms), len(batch["input_ids"]))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if (self.global_step + 1) % self.hparams.target_sync_every == 0:  # global_step counts steps before this one
            self.sync_target_heads()

    def sync_target_heads(self) -> None:
        """Move the target Q heads a share ``alpha`` towards the Q heads (``ilql_losses.polyak_update``)."""
        polyak_update(self.target_q_heads.parameters(), self.heads.q_heads.parameters(), self.hparams.alpha)

    def export_extras(self, path: Path) -> None:
        """The decoding heads and ``beta`` beside the exported LM (``ilql_heads.save_heads``)."""
        save_heads(self.decoding_heads(), path, self.hparams.beta)


def check_ilql_arguments(
    tau: float, gamma: float, cql_scale: float, awac_scale: float, alpha: float, target_sync_every: int, beta: float
) -> None:
    """Fail on ILQL hyperparameters that cannot work, naming them as ``model.<argument>``."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"model.tau must be in (0, 1), got {tau}.")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"model.gamma must be in (0, 1], got {gamma}.")
    if not (cql_scale >= 0 and awac_scale >= 0):
        raise ValueError(f"model.cql_scale and model.awac_scale must be >= 0, got {cql_scale} and {awac_scale}.")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"model.alpha must be in (0, 1], got {alpha}.")
    if target_sync_every < 1:
        raise ValueError(f"model.target_sync_every must be >= 1, got {target_sync_every}.")
    if not beta >= 0:
        raise ValueError(f"model.beta must be >= 0, got {beta}.")
