"""Callbacks on a tiny LightningModule: metrics history, sample tables, export to transformers format."""

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_rlhf.callbacks import HFExportCallback, MetricsHistory, SampleTable


class PromptSet(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"prompt": f"prompt {i}", "x": torch.full((4,), float(i))}


def loader() -> DataLoader:
    return DataLoader(PromptSet(), batch_size=2)


class RLLike(pl.LightningModule):
    """Manual optimisation with two optimizer steps per training_step, like PPO's epochs × minibatches."""

    def __init__(self, return_prompts: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)
        self.return_prompts = return_prompts

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(2):
            opt.zero_grad()
            loss = self.layer(batch["x"]).pow(2).mean()
            self.manual_backward(loss)
            opt.step()
        self.log("objective/reward", float(batch_idx))
        self.log("objective/kl", 0.5 * batch_idx)
        out = {"completions": [f"reply | {p}\nend" for p in batch["prompt"]], "scores": torch.tensor([0.25, -0.5])}
        if self.return_prompts:
            out["prompts"] = batch["prompt"]
        return out

    def validation_step(self, batch, batch_idx):
        self.log("val/reward", 7.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return loader()

    def val_dataloader(self):
        return loader()


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        callbacks=callbacks,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def test_metrics_history_records_train_and_val_rows(tmp_path):
    history = MetricsHistory(dirpath=str(tmp_path / "run"))
    trainer(tmp_path, [history], val_check_interval=2).fit(RLLike())
    train = [r for r in history.history if r.get("stage") != "val"]
    val = [r for r in history.history if r.get("stage") == "val"]
    # 4 batches × 2 optimizer steps: rows carry the loggers' step (metrics.csv, TensorBoard), one per batch, as in
    # RLHFModule one per RL iteration, not trainer.global_step (2, 4, 6, 8)
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    assert [r["objective/reward"] for r in train] == [0.0, 1.0, 2.0, 3.0]
    assert [r["objective/kl"] for r in train] == [0.0, 0.5, 1.0, 1.5]
    assert all("val/reward" not in r for r in train)  # the stale validation value stays out of training rows
    assert [(r["step"], r["val/reward"]) for r in val] == [(1, 7.0), (3, 7.0)]  # after batches 1 and 3
    assert all("objective/reward" not in r for r in val)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history.history
    assert history.columns()["objective/kl"] == [0.0, 0.5, 1.0, 1.5]

    # a resumed run gets its history back and rewrites the file from it
    resumed = MetricsHistory(dirpath=str(tmp_path / "resumed"))
    resumed.load_state_dict(history.state_dict())
    trainer(tmp_path, [resumed], max_steps=0).fit(RLLike())
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == len(history.history)


def test_metrics_history_prefix_filter(tmp_path):
    history = MetricsHistory(dirpath=str(tmp_path), prefixes=["objective/kl"], every_n_steps=4)
    trainer(tmp_path, [history], limit_val_batches=0).fit(RLLike())
    # logged steps 0, 1, 2, 3: a row once 4 steps are done, i.e. at step 3
    assert history.history == [{"step": 3, "epoch": 0, "objective/kl": 1.5}]


def test_sample_table_writes_jsonl_and_markdown(tmp_path):
    table = SampleTable(dirpath=str(tmp_path), every_n_steps=2, num_samples=1)
    trainer(tmp_path, [table], limit_val_batches=0).fit(RLLike(return_prompts=False))
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    # written after the first batch (logged step 0) and whenever 2 more steps are done (steps 1 and 3);
    # prompts come from the batch's "prompt" field, scores from the outputs
    assert rows == [
        {"step": 0, "prompt": "prompt 0", "completion": "reply | prompt 0\nend", "score": 0.25},
        {"step": 1, "prompt": "prompt 2", "completion": "reply | prompt 2\nend", "score": 0.25},
        {"step": 3, "prompt": "prompt 6", "completion": "reply | prompt 6\nend", "score": 0.25},
    ]
    markdown = (tmp_path / "samples.md").read_text()
    assert "## step 0" in markdown and "| prompt 0 | reply \\| prompt 0<br>end | 0.250 |" in markdown


def test_sample_table_warns_without_completions(tmp_path):
    class NoOutputs(RLLike):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)

    table = SampleTable(dirpath=str(tmp_path))
    with pytest.warns(UserWarning, match="no 'completions'"):
        trainer(tmp_path, [table], limit_val_batches=0).fit(NoOutputs())
    assert not (tmp_path / "samples.jsonl").exists()


class TinyPolicy(RLLike):
    def __init__(self, path: str) -> None:
        super().__init__()
        from lit_rlhf.models import load_causal_lm, load_tokenizer

        self.policy = load_causal_lm(path)
        self.tokenizer = load_tokenizer(path)

    def export_model(self):
        return self.policy, self.tokenizer

    def configure_optimizers(self):
        return torch.optim.SGD(list(self.layer.parameters()) + list(self.policy.parameters()), lr=0.1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        ids = torch.tensor([[5, 6, 7, 8]])
        self.manual_backward(self.policy(input_ids=ids, labels=ids).loss)
        opt.step()


def test_hf_export_callback_saves_loadable_checkpoints(tmp_path, tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = TinyPolicy(tiny_llama_path)
    export = HFExportCallback(dirpath=str(tmp_path / "hf"), every_n_steps=2)
    trainer(tmp_path, [export], max_steps=3, limit_val_batches=0).fit(module)
    assert [p.name for p in export.exported] == ["step-2", "final"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "final")
    for name, tensor in module.policy.state_dict().items():
        assert torch.equal(final.state_dict()[name], tensor), name  # the trained weights, not the initial ones
    assert AutoTokenizer.from_pretrained(tmp_path / "hf" / "final").eos_token == "<|im_end|>"


class TinyPolicyWithCritic(TinyPolicy):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.head = torch.nn.Linear(self.policy.config.hidden_size, 1)

    def export_critic(self):
        from lit_rlhf.finetuning import token_classifier

        return token_classifier(self.policy.model, self.head)


@pytest.mark.parametrize("critic", [True, False])
def test_hf_export_callback_saves_the_critic_in_the_models_folder(critic, tmp_path, tiny_llama_path):
    from transformers import AutoModelForTokenClassification

    module = TinyPolicyWithCritic(tiny_llama_path)
    export = HFExportCallback(dirpath=str(tmp_path / "hf"), critic=critic)
    trainer(tmp_path, [export], max_steps=1, limit_val_batches=0).fit(module)
    folder = tmp_path / "hf" / "final" / "critic"
    assert folder.exists() == critic
    if critic:
        exported = AutoModelForTokenClassification.from_pretrained(folder)
        assert torch.equal(exported.score.weight, module.head.weight)
        assert torch.equal(exported.score.bias, module.head.bias)
        assert torch.equal(exported.model.norm.weight, module.policy.model.norm.weight)


def test_hf_export_callback_requires_the_hook(tmp_path):
    with pytest.raises(TypeError, match="RLLike.export_model"):
        trainer(tmp_path, [HFExportCallback(dirpath=str(tmp_path))], max_steps=1).fit(RLLike())
