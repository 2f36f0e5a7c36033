"""What the training stages share (``lit_rlhf.finetuning``): the default fused AdamW takes torch's step; a trunk and
a scalar head become a transformers token classifier."""

import pytest
import torch


def test_default_adamw_is_fused_and_takes_the_same_step_as_torch_loop():
    from lit_rlhf.finetuning import adamw

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    fused_params = [torch.nn.Parameter(w.clone()) for w in weights]
    loop_params = [torch.nn.Parameter(w.clone()) for w in weights]
    fused = adamw([{"params": fused_params[:1]}, {"params": fused_params[1:], "lr": 0.1}], 0.01, 0.05)
    loop = torch.optim.AdamW(
        [{"params": loop_params[:1]}, {"params": loop_params[1:], "lr": 0.1}], lr=0.01, weight_decay=0.05, foreach=False
    )
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    assert [g["lr"] for g in fused.param_groups] == [0.01, 0.1]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b, w in zip(fused_params, loop_params, weights, strict=True):
        assert not torch.equal(a, w)  # it stepped
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_default_adamw_falls_back_where_there_is_no_fused_kernel():
    from lit_rlhf.finetuning import adamw

    assert adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], 0.1, 0.0).defaults["fused"]
    # torch has no fused AdamW for the meta device: the helper leaves the choice to torch instead of failing.
    on_meta = adamw([torch.nn.Parameter(torch.empty(2, device="meta"))], 0.1, 0.0)
    assert not on_meta.defaults["fused"]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_an_absurd_learning_rate_stops_the_run_before_a_checkpoint_holds_bad_weights(stage, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_rlhf.data import PreferenceDataModule, SFTDataModule
    from lit_rlhf.reward import RewardModelModule
    from lit_rlhf.sft import SFTModule

    examples = "lit_rlhf/data/examples"
    if stage == "sft":
        module = SFTModule(model="tiny-llama", learning_rate=1e39, warmup_ratio=0.0, scheduler="constant")
        data = SFTDataModule("tiny-llama", train_path=f"{examples}/sft_tiny.jsonl", batch_size=4, max_length=64)
    else:
        module = RewardModelModule(backbone="tiny-llama", learning_rate=1e39, warmup_ratio=0.0, scheduler="constant")
        data = PreferenceDataModule("tiny-llama", train_path=f"{examples}/preferences_tiny.jsonl", batch_size=4)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[checkpoints], logger=False, enable_progress_bar=False, limit_val_batches=0
    )
    with pytest.raises(FloatingPointError, match="no longer finite .*lower model.learning_rate"):
        trainer.fit(module, data)
    assert not list(tmp_path.glob("*.ckpt"))  # the step that broke the weights saved nothing


def test_token_classifier_holds_the_trunk_and_the_head_and_refuses_a_model_that_is_not_a_trunk():
    from lit_rlhf.finetuning import token_classifier
    from lit_rlhf.models import load_causal_lm

    lm = load_causal_lm("tiny-llama")
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    classifier = token_classifier(lm.model, head)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = head(lm.model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(classifier(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="pass the bare transformer"):
        token_classifier(lm, head)  # the causal LM's weights sit under model.*, not where a trunk's go
