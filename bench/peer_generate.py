"""The peer of the generation benchmark: plain ``transformers`` ``model.generate`` on the same prompts, batch and
settings as ``RLHFModule.generate`` (``peer_generate.py generation CONFIG.json OUT.json``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import read_config, set_threads, steady_mean, write_result  # noqa: E402


def run_generation(cfg: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in cfg["prompts"]
    ]
    durations, counts = [], []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg["max_new_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        durations.append(time.perf_counter() - start)
        counts.append(sum(min(len(tokenizer(c)["input_ids"]) + 1, cfg["max_new_tokens"]) for c in completions))
    return {"tokens_per_second": steady_mean([n / d for n, d in zip(counts, durations, strict=True)])}


if __name__ == "__main__":
    task = sys.argv.pop(1)
    config = read_config()
    set_threads(config["threads"])
    write_result({"generation": run_generation}[task](config))
