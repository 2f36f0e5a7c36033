"""Run by tests/test_scale.py: 2 CPU processes (gloo DDP) train RLHFModule on tiny-llama; each rank saves what the
test compares (trainable weights after every iteration, its completions, the logged metrics).

Usage: python tests/scripts/ddp_rl.py OUT_DIR [--lora] [--one-minibatch]

``--one-minibatch``: PPO takes one minibatch per epoch without accumulation, so the update's first pass reuses the
rollout's forward; otherwise 2 minibatches of 2 accumulated micro-batches.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[2]))
from lit_rlhf.rl import PPO  # noqa: E402
from tests.rl.support import Outputs, prompt_loader, tiny_module  # noqa: E402


class Record(Outputs):
    """Keeps each iteration's trainable weights and reduced metrics beside the step outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        trainable = [p.detach().flatten() for p in pl_module.parameters() if p.requires_grad]
        self.weights.append(torch.cat(trainable).clone())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    from lit_rlhf.models import LoraOptions
    from lit_rlhf.rewards import LengthReward

    one_minibatch = "--one-minibatch" in sys.argv

    module = tiny_module(
        # Never 0 for these short responses: every rank's returns vary, so every logged metric is a number.
        reward=LengthReward(target=8, unit="chars"),
        algorithm=PPO(epochs=2, num_minibatches=1 if one_minibatch else 2, target_kl=0.5),
        gradient_accumulation_steps=1 if one_minibatch else 2,
        lora=LoraOptions(r=4) if "--lora" in sys.argv else None,
        learning_rate=1e-2,
    )
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # Both ranks get the same prompts, so different completions can only come from different sampling seeds.
        use_distributed_sampler=False,
        callbacks=[record],
    )
    trainer.fit(module, prompt_loader())
    torch.save(
        {
            "weights": record.weights,
            "metrics": record.metrics,
            "completions": [o["completions"] for o in record.outputs],
            "local_scores": [o["scores"] for o in record.outputs],
            "initial": torch.cat([p.detach().flatten() for p in tiny_module().parameters() if p.requires_grad]),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
