"""Stage 3: PPO (or any ``PolicyOptimizer``) against the learned reward model, with policy snapshots for evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_rlhf.callbacks import HFExportCallback, MetricsHistory, SampleTable
from lit_rlhf.finetuning import export_pretrained
from lit_rlhf.pipeline.common import RunPaths, make_trainer, prompt_data, reward_model
from lit_rlhf.pipeline.config import PipelineConfig
from lit_rlhf.rl import RLHFModule

SNAPSHOT_PREFIX = "iter-"


def snapshot_name(iteration: int) -> str:
    """Folder name of the policy snapshot taken after ``iteration`` RL iterations."""
    return f"{SNAPSHOT_PREFIX}{iteration:04d}"


def snapshot_iteration(path: Path) -> int:
    """The iteration count encoded in a snapshot folder's name."""
    return int(path.name.removeprefix(SNAPSHOT_PREFIX))


def list_snapshots(folder: Path) -> list[Path]:
    """Snapshot folders in iteration order."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.startswith(SNAPSHOT_PREFIX)), key=snapshot_iteration
    )


def save_policy(module: RLHFModule, path: Path) -> Path:
    """The policy's trainable state: a PEFT adapter folder under LoRA, else a full transformers checkpoint."""
    from peft import PeftModel

    if isinstance(module.policy, PeftModel):
        module.policy.save_pretrained(path)
        return path
    return export_pretrained(module.policy, module.tokenizer, path)


class PolicySnapshots(Callback):
    """Save the policy after every ``every`` RL iterations and at the end of training, as ``dirpath/iter-NNNN``, and
    with each snapshot a resume point: a Lightning checkpoint of the whole run, so an interrupted stage continues
    from its last snapshot exactly as it would have run on.

    Counts ``RLHFModule.iteration`` (rollouts), not ``trainer.global_step`` (optimizer steps). With LoRA a snapshot is
    the adapter alone (megabytes), which evaluation loads onto the one base model it keeps in memory.

    Args:
        dirpath: Output folder.
        every: Iterations between snapshots.
        resume: Where the resume point goes (overwritten each time); None for none.
    """

    def __init__(self, dirpath: str | Path, every: int, resume: str | Path | None = None) -> None:
        if every < 1:
            raise ValueError(f"rl.checkpoint_every must be >= 1, got {every}.")
        self.dirpath, self.every, self.resume = Path(dirpath), every, resume
        self._last: int | None = None

    def _save(self, trainer: L.Trainer, module: RLHFModule) -> None:
        if module.iteration == self._last:
            return
        self._last = module.iteration
        if trainer.is_global_zero:
            save_policy(module, self.dirpath / snapshot_name(module.iteration))
        if self.resume is not None:
            # every rank takes part (sharded strategies gather); the full state, optimizer included, to resume from
            trainer.save_checkpoint(self.resume, weights_only=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.iteration % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last": self._last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = state_dict.get("last")


def run_rl(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Fine-tune the policy against ``reward/model`` (or ``rl.reward``); write ``rl/metrics.jsonl``,
    ``rl/checkpoints/iter-*`` and, with ``rl.export_final``, ``rl/hf/final``. A run interrupted after a snapshot
    continues from it (``rl/resume.ckpt`` in the stage's partial folder, removed once the stage is done)."""
    rc = config.rl
    reward = rc.model.get("reward") or reward_model(config, paths)
    L.seed_everything(config.seed, verbose=False)
    module = RLHFModule(**{**rc.model, "policy": config.policy, "reward": reward})
    data = prompt_data(config, "train", rc.batch_size, rc.num_prompts)
    batches_per_epoch = math.ceil(len(data.datasets["train"]) / rc.batch_size)  # the prompts' (ptx never ends)
    resume = paths.rl / "resume.ckpt"
    history = MetricsHistory(dirpath=str(paths.rl))
    callbacks: list[Callback] = [history, SampleTable(dirpath=str(paths.rl), every_n_steps=rc.checkpoint_every)]
    if rc.export_final:
        callbacks.append(HFExportCallback(dirpath=str(paths.rl / "hf"), on_train_end=True))
    # Last, so the resume point holds what the other callbacks recorded of its iteration.
    callbacks.append(PolicySnapshots(paths.snapshots, rc.checkpoint_every, resume))
    trainer = make_trainer(
        config,
        rc.trainer,
        max_epochs=math.ceil(rc.iterations / batches_per_epoch),
        default_root_dir=str(paths.rl),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume if resume.exists() else None, weights_only=True)
    resume.unlink(missing_ok=True)

    last = history.history[-1] if history.history else {}
    return {
        "iterations": module.iteration,
        "prompts_per_iteration": rc.batch_size,
        "train_prompts": len(data.datasets["train"]),
        "optimizer_steps": trainer.global_step,
        "algorithm": type(module.algorithm).__name__,
        "final_kl_coef": module.kl.coef,
        "last": {k: last[k] for k in ("objective/score", "objective/kl", "response/length") if k in last},
        "snapshots": [p.name for p in list_snapshots(paths.snapshots)],
    }
