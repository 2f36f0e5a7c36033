"""TRL's last top-level ``PPOTrainer`` (trl 0.25.1: policy, reference, reward and value models), run by
``bench/run.py`` in ``bench/.venv-trl-ppo``: ``peer_trl_ppo.py ppo CONFIG.json OUT.json``.

Its reward must be an ``nn.Module`` scored through ``trl.trainer.utils.get_reward``; to give it the same VADER reward
as our side, that call is redirected to a function for a placeholder module (the value model still goes through
TRL's own code).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import read_config, rl_timing, set_threads, write_result  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class VaderPlaceholder(nn.Module):
    """Stands where TRL expects a reward model; ``get_reward`` is redirected to VADER for it."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1), requires_grad=False)


class IterationClock(TrainerCallback):
    """TRL's PPO loop calls ``on_step_end`` once per iteration and no ``on_step_begin``: time end to end."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.durations.append(now - self._last)
        self._last = now


def tokenizer_from_files(folder: Path):
    """A tokenizer saved by transformers 5 (class ``TokenizersBackend``, list-valued ``extra_special_tokens``), which
    this venv's 4.x cannot load by name: rebuilt from its ``tokenizer.json``, special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), padding_side="left", **special)
    template = folder / "chat_template.jinja"
    tokenizer.chat_template = template.read_text() if template.exists() else config.get("chat_template")
    return tokenizer


def run_ppo(cfg: dict[str, Any]) -> dict[str, Any]:
    import trl.trainer.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import PPOConfig, PPOTrainer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg["model"], padding_side="left")
    except (ValueError, ImportError, AttributeError):
        tokenizer = tokenizer_from_files(Path(cfg["model"]))
    # TRL's PPO finds padding by token id, so padding must differ from EOS (SmolLM2 pads with its EOS); use an
    # existing unused token rather than growing the vocabulary.
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    analyzer = SentimentIntensityAnalyzer()
    placeholder = VaderPlaceholder()
    scores: list[float] = []
    tokens: list[int] = []
    trl_get_reward = ppo_module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not placeholder:
            return trl_get_reward(model, query_responses, pad_token_id, context_length)
        responses = query_responses[:, context_length:]
        kept = responses != pad_token_id  # the response up to and including its EOS
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        values = torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts])
        scores.append(values.mean().item())
        tokens.append(int(kept.sum()))
        return None, values.to(query_responses.device), None

    ppo_module.get_reward = get_reward

    prompts = [json.loads(line)["prompt"] for line in Path(cfg["prompts_file"]).read_text().splitlines()]
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in prompts
    ]
    encoded = [e["input_ids"] if isinstance(e, dict) else list(e) for e in encoded]
    dataset = Dataset.from_list([{"input_ids": ids} for ids in encoded])
    rows = cfg["prompts_per_iter"] * cfg["num_samples"]
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-bench-"),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=cfg["seed"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=cfg["epochs"],
        total_episodes=rows * cfg["iterations"],
        response_length=cfg["max_new_tokens"],
        temperature=cfg["temperature"],
        kl_coef=cfg["kl_coef"],
        stop_token="eos",
        num_sample_generations=0,
        disable_tqdm=True,
        bf16=cfg["precision"] == "bf16",  # TRL's default is bf16 and gradient checkpointing: both set explicitly
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    torch.manual_seed(cfg["seed"])
    policy = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(
        cfg["model"], num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id
    )
    clock = IterationClock()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=placeholder,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(min(len(dataset), rows))),
        callbacks=[clock],
    )
    trainer.train()
    return rl_timing(clock.durations, tokens, scores)


if __name__ == "__main__":
    task = sys.argv.pop(1)
    config = read_config()
    set_threads(config["threads"])
    write_result({"ppo": run_ppo}[task](config))
