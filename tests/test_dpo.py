"""DPOModule and its losses: the loss variants on hand-worked numbers, log-probs of the response tokens only, the three
kinds of reference, the cached reference log-probs, checkpoints without the reference, export, and learning."""

from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_rlhf.data.preferences import PreferenceDataModule
from lit_rlhf.dpo import DPOModule, preference_loss, response_logprobs
from lit_rlhf.models import LoraOptions
from lit_rlhf.sft import completion_nll

PAIRS = str(Path(__file__).parents[1] / "lit_rlhf" / "data" / "examples" / "preferences_tiny.jsonl")

# Implicit rewards h of two pairs: the first prefers chosen by 1 nat, the second rejected by 2.
CHOSEN, REJECTED = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])


def test_dpo_loss_by_hand():
    # beta 0.5: z = 0.5 * (h_c - h_r) = [0.5, -1.0]; -log sigma(0.5) = 0.474077, -log sigma(-1) = 1.313262.
    losses = preference_loss(CHOSEN, REJECTED, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.474077, 1.313262]), atol=1e-5, rtol=0)


def test_cdpo_label_smoothing_by_hand():
    # eps 0.1: 0.9 * 0.474077 + 0.1 * (-log sigma(-0.5) = 0.974077) = 0.524077;
    #          0.9 * 1.313262 + 0.1 * (-log sigma(1) = 0.313262) = 1.213262.
    losses = preference_loss(CHOSEN, REJECTED, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.524077, 1.213262]), atol=1e-5, rtol=0)


def test_robust_dpo_by_hand():
    # (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = 0.411577; (0.9 * 1.313262 - 0.1 * 0.313262) / 0.8 = 1.438262.
    losses = preference_loss(CHOSEN, REJECTED, beta=0.5, loss="robust", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.411577, 1.438262]), atol=1e-5, rtol=0)


def test_ipo_by_hand():
    # Target margin 1 / (2 * 0.5) = 1: (1 - 1)^2 = 0 and (-2 - 1)^2 = 9.
    losses = preference_loss(CHOSEN, REJECTED, beta=0.5, loss="ipo")
    torch.testing.assert_close(losses, torch.tensor([0.0, 9.0]))


def test_simpo_by_hand():
    # beta 2, gamma 0.5: z = 2 * [1, -2] - 0.5 = [1.5, -4.5]; -log sigma(1.5) = 0.201413, -log sigma(-4.5) = 4.511048.
    losses = preference_loss(CHOSEN, REJECTED, beta=2.0, loss="simpo", simpo_gamma=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.201413, 4.511048]), atol=1e-5, rtol=0)


def test_dpo_loss_gradient_raises_the_chosen_side():
    chosen, rejected = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    preference_loss(chosen, rejected, beta=0.1).sum().backward()
    # d/dh_c of -log sigma(beta * (h_c - h_r)) at 0 is -beta * sigma(0) = -0.05; +0.05 for h_r.
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"loss": "kto"}, "model.loss must be one of"),
        ({"beta": 0.0}, "model.beta must be > 0"),
        ({"loss": "robust", "label_smoothing": 0.5}, r"\[0, 0.5 for the robust loss\)"),
        ({"loss": "simpo", "precompute_reference": True}, "uses no reference model"),
    ],
)
def test_bad_arguments_fail_before_loading(arguments, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(model="does-not-exist", **arguments)


def data(batch_size: int = 4, **kwargs) -> PreferenceDataModule:
    module = PreferenceDataModule(
        "tiny-llama", train_path=PAIRS, batch_size=batch_size, max_length=320, encoding="causal_lm", **kwargs
    )
    module.setup("fit")
    return module


def first_batch(**kwargs) -> dict[str, torch.Tensor]:
    return next(iter(data(**kwargs).train_dataloader()))


def test_response_logprobs_match_the_full_softmax(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    batch = first_batch()
    logps, tokens = response_logprobs(
        model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
    )
    logits = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    nll, expected_tokens = completion_nll(logits, batch["chosen_labels"])
    torch.testing.assert_close(logps, -nll, atol=1e-4, rtol=1e-5)
    assert tokens.tolist() == expected_tokens.tolist() and (tokens > 0).all()


def test_causal_lm_batches_label_the_responses_only():
    batch = first_batch()
    for side in ("chosen", "rejected"):
        labels, ids, mask = batch[f"{side}_labels"], batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        labelled = labels != -100
        assert (labels[labelled] == ids[labelled]).all() and not (labelled & (mask == 0)).any()
        assert not labelled[:, 0].any(), "the prompt opens every row"
    indices = batch["index"].tolist()
    assert len(set(indices)) == len(indices) == 4 and all(0 <= i < 40 for i in indices)


def test_rankings_need_the_reward_model_encoding(tmp_path):
    source = tmp_path / "ranked.jsonl"
    source.write_text('{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}\n')
    module = PreferenceDataModule("tiny-llama", train_path=str(source), encoding="causal_lm")
    module.setup("fit")
    with pytest.raises(ValueError, match="reads preference pairs; this source holds rankings"):
        module.train_dataloader()


def test_a_reward_model_batch_is_refused_with_the_fix():
    module = DPOModule(model="tiny-llama")
    batch = next(iter(PreferenceDataModule("tiny-llama", train_path=PAIRS, batch_size=2).train_dataloader()))
    with pytest.raises(ValueError, match="encoding: causal_lm"):
        module.training_step(batch, 0)


def test_at_the_start_the_policy_is_its_reference():
    # Frozen copy: h = 0 on both sides, so the loss is log 2 and every implicit reward 0.
    module = DPOModule(model="tiny-llama")
    assert module.reference is not None
    batch = first_batch()
    loss = module._step(batch, "val")
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_lora_reference_is_the_adapter_off():
    module = DPOModule(model="tiny-llama", lora=LoraOptions(r=4, alpha=8))
    assert module.reference is None, "no second copy with LoRA"
    base = DPOModule(model="tiny-llama").reference
    batch = first_batch()
    with torch.no_grad():  # move the adapter off zero, so that the policy differs from its reference
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    ids, mask, labels = DPOModule._stacked(batch)
    expected = response_logprobs(base, ids, mask, labels)[0]
    torch.testing.assert_close(module._reference_logps(ids, mask, labels), expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(response_logprobs(module.model, ids, mask, labels)[0], expected, atol=1e-3)


def fit(module: DPOModule, root: Path, steps: int = 3, **trainer) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        **{"enable_checkpointing": False, **trainer},
    )
    trainer.fit(module, datamodule=data(val_fraction=0.2))
    return trainer


def test_precomputed_reference_trains_like_the_live_one(tmp_path, monkeypatch):
    live = DPOModule(model="tiny-llama", learning_rate=1e-3, warmup_ratio=0.0)
    fit(live, tmp_path / "live")
    cached = DPOModule(model="tiny-llama", learning_rate=1e-3, warmup_ratio=0.0, precompute_reference=True)
    calls = []
    original = cached._reference_logps
    monkeypatch.setattr(cached, "_reference_logps", lambda *stacked: calls.append(1) or original(*stacked))
    fit(cached, tmp_path / "cached")
    # 32 training pairs at batch 4 and 8 validation pairs at batch 4: 8 + 2 reference batches before the first
    # step, and none after it.
    assert len(calls) == 10
    assert not cached.reference_logps["train"].isnan().any() and cached.reference_logps["train"].shape == (32, 2)
    for (name, a), (_, b) in zip(live.model.named_parameters(), cached.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_checkpoints_leave_out_the_reference_and_keep_the_cache(tmp_path):
    module = DPOModule(model="tiny-llama", precompute_reference=True, learning_rate=1e-3)
    trainer = fit(module, tmp_path, steps=2, enable_checkpointing=True)
    path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(path, weights_only=False)
    assert not any(key.startswith("reference.") for key in checkpoint["state_dict"])
    restored = DPOModule.load_from_checkpoint(path)
    torch.testing.assert_close(restored.reference_logps["train"], module.reference_logps["train"])
    for a, b in zip(restored.model.parameters(), module.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_export_loads_in_plain_transformers(tmp_path):
    module = DPOModule(model="tiny-llama", lora=LoraOptions(r=4, alpha=8))
    fit(module, tmp_path, steps=1)
    folder = module.export(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    batch = first_batch()
    ids, mask, labels = DPOModule._stacked(batch)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            response_logprobs(loaded, ids, mask, labels)[0],
            response_logprobs(module.model, ids, mask, labels)[0],
            atol=1e-4,
            rtol=1e-5,
        )


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_training_separates_chosen_from_rejected(tmp_path, loss):
    # 20 steps of lr 1e-3 on the 32 packaged pairs (2.5 epochs): the margin between chosen and rejected grows.
    beta = 2.0 if loss == "simpo" else 0.1
    module = DPOModule(model="tiny-llama", loss=loss, beta=beta, learning_rate=1e-3, warmup_ratio=0.0)
    batch = first_batch(batch_size=32)
    ids, mask, labels = DPOModule._stacked(batch)

    def margin() -> float:  # what the loss separates: summed log-probs (DPO, IPO), per token (SimPO)
        with torch.no_grad():
            logps, tokens = response_logprobs(module.model, ids, mask, labels)
            scores = logps / tokens if loss == "simpo" else logps
            return float((scores[:32] - scores[32:]).mean())

    before = margin()
    fit(module, tmp_path, steps=20)
    # Measured: sigmoid -256.8 -> -217.5 nats, IPO -256.8 -> -253.4 (it aims at a margin of 1 / (2 beta) = 5 in
    # log-ratios, not more), SimPO 0.01 -> 0.38 nats per token.
    assert margin() > before + (0.1 if loss == "simpo" else 1.0)
