"""PPO-ptx on SmolLM2: the policy's perplexity on held-out ptx text after RL with and without the ptx term, and the
reward both runs reached (the table in docs/stages.md, "PPO-ptx").

    python scripts/measure_ptx.py [--ptx_path ../shared/data/hh-rlhf-harmless-dev.jsonl.gz] [--iterations 30]

The ptx text is SFT rows (here the chosen hh-rlhf transcripts): the first ``--train_rows`` rows of the file feed the
ptx stream, the next ``--eval_rows`` measure perplexity (never trained on). The RL task is the SmolLM2 PPO
recipe's (VADER positive sentiment, LoRA), shortened; both runs share the seed, so they see the same prompts in the
same order.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import lightning as L
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.data.encoding import SFTCollator
from lit_rlhf.data.sft import SFTDataset, read_sft
from lit_rlhf.models import LoraOptions, load_tokenizer
from lit_rlhf.rewards import SentimentReward
from lit_rlhf.rl import PPO, FixedKL, GenerationOptions, RLHFModule
from lit_rlhf.rl.update import ptx_loss

POLICY = "smollm2-135m-instruct"


class Scores(L.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append(outputs["metrics"])


def perplexity(policy: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """exp of the mean negative log-likelihood per labelled token over all ``batches``."""
    total, tokens = 0.0, 0
    policy.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in batches:
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += ptx_loss(policy, batch).item() * count
            tokens += count
    return math.exp(total / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptx_path", default="../shared/data/hh-rlhf-harmless-dev.jsonl.gz")
    parser.add_argument("--train_rows", type=int, default=512)
    parser.add_argument("--eval_rows", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--ptx_coef", type=float, default=1.0)
    parser.add_argument("--output", default="outputs/ptx")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    tokenizer = load_tokenizer(POLICY, padding_side="right")
    rows = read_sft(args.ptx_path, tokenizer)
    train_file = out / "ptx_train.jsonl"
    with gzip.open(args.ptx_path, "rt") if args.ptx_path.endswith(".gz") else open(args.ptx_path) as f:
        train_file.write_text("".join(line for _, line in zip(range(args.train_rows), f, strict=False)))
    held_out = SFTDataset(rows[args.train_rows : args.train_rows + args.eval_rows], tokenizer, args.max_length)
    collate = SFTCollator(tokenizer.pad_token_id)
    starts = range(0, len(held_out), 8)
    eval_batches = [collate([held_out[i] for i in range(s, min(s + 8, len(held_out)))]) for s in starts]

    results: dict[str, object] = {"settings": vars(args), "runs": {}}
    for coef in (0.0, args.ptx_coef):
        L.seed_everything(0, verbose=False)
        module = RLHFModule(
            POLICY,
            reward=SentimentReward(target="positive"),
            algorithm=PPO(epochs=2, num_minibatches=2),
            kl=FixedKL(0.02),
            generation=GenerationOptions(max_new_tokens=32),
            lora=LoraOptions(r=16, alpha=32),
            value_model="shared",
            learning_rate=5e-4,
            max_iterations=args.iterations,
            rollout_seed=0,
            ptx_coef=coef,
        )
        if "before" not in results:
            results["before"] = perplexity(module.policy, eval_batches)
        data = PromptDataModule(
            POLICY, batch_size=8, max_prompt_length=96, seed=0,
            ptx_path=str(train_file) if coef > 0 else None, ptx_batch_size=8, ptx_max_length=args.max_length,
        )  # fmt: skip
        scores = Scores()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=100, precision="bf16-mixed", logger=False,
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[scores],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
        last = scores.metrics[-10:]
        results["runs"][f"ptx_coef={coef}"] = {
            "perplexity": perplexity(module.policy, eval_batches),
            "score_first10": sum(m["objective/score"] for m in scores.metrics[:10]) / len(scores.metrics[:10]),
            "score_last10": sum(m["objective/score"] for m in last) / len(last),
            "kl_last10": sum(m["objective/kl"] for m in last) / len(last),
            "seconds": seconds,
        }
        print(json.dumps(results, indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
