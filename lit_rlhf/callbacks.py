"""Lightning callbacks: export to plain transformers format, a per-step metrics log, and sample tables."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.finetuning import export_module
from lit_rlhf.reporting import markdown_table

__all__ = ["HFExportCallback", "MetricsHistory", "SampleTable"]


def _output_dir(trainer: pl.Trainer, dirpath: str | None) -> Path:
    """``dirpath`` if given, else the logger's run folder (``lightning_logs/version_N``), else the root dir."""
    if dirpath is not None:
        return Path(dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir)


def logged_step(trainer: pl.Trainer) -> int:
    """The step loggers put this batch's metrics at (``metrics.csv``, TensorBoard, W&B), which every callback here
    uses too: one RL iteration in ``RLHFModule`` (however many optimizer steps its update takes), one optimizer step
    in the supervised stages. Lightning keeps it as the epoch loop's count of batches that stepped."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _due(step: int, last: int | None, every_n_steps: int | None) -> bool:
    """Whether logged step ``step`` (0-based) completes a multiple of ``every_n_steps`` steps not yet acted on:
    a multiple of n lies in (last + 1, step + 1], counting steps done (``last`` None: none yet)."""
    if not every_n_steps:
        return False
    done, acted = step + 1, (last + 1) if last is not None else 0
    return done // every_n_steps > acted // every_n_steps


class HFExportCallback(pl.Callback):
    """Save the module's model as a plain ``transformers`` checkpoint (LoRA merged) during and after training.

    Hook the LightningModule must implement::

        def export_model(self) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
            '''The model to export (e.g. the policy, possibly a peft model) and its tokenizer.'''

    Checkpoints go to ``dirpath/step-{n}`` after every ``every_n_steps`` logged steps (``logged_step``: an RL
    iteration, an optimizer step in the supervised stages; ``n`` counts the steps done), and to
    ``dirpath/final`` at the end of fit; each loads with ``AutoModelFor*.from_pretrained``. A module with a critic
    (``export_critic()`` returns a model: ``RLHFModule`` with a ``value_model``) gets it in each folder's
    ``critic/`` subfolder, a one-label ``AutoModelForTokenClassification``. Only global rank 0 writes. Under FSDP,
    ``export_model`` must return a model whose parameters are gathered (not sharded).

    Args:
        dirpath: Output folder; default ``<log_dir>/hf``.
        every_n_steps: Export every this many logged steps; None to export only at the end.
        on_train_end: Export ``final`` when fit ends.
        critic: Export the module's critic too, when it has one.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_steps: int | None = None,
        on_train_end: bool = True,
        critic: bool = True,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"HFExportCallback(every_n_steps={every_n_steps}): use a positive number or None.")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.export_on_train_end = on_train_end
        self.critic = critic
        self.exported: list[Path] = []
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Fail before training rather than after hours of it.
        if stage == "fit" and not callable(getattr(pl_module, "export_model", None)):
            raise TypeError(
                f"HFExportCallback needs {type(pl_module).__name__}.export_model() -> (model, tokenizer) to find the "
                "model to save; implement it on the LightningModule or remove the callback."
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "HFExportCallback exports from rank 0 alone, which cannot gather FSDP shards: remove it and export the "
                "checkpoint afterwards with `lit-rlhf export STAGE CKPT OUT` (see docs/scaling.md)."
            )

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        """Export now to ``dirpath/name`` (and the critic to ``dirpath/name/critic``); returns the folder on rank 0,
        None elsewhere."""
        if not trainer.is_global_zero:
            return None
        folder = (Path(self.dirpath) if self.dirpath else _output_dir(trainer, None) / "hf") / name
        path = export_module(pl_module, folder, critic=self.critic)
        self.exported.append(path)
        return path

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = logged_step(trainer)
        if _due(step, self._last_step, self.every_n_steps):
            self._last_step = step
            self.export(trainer, pl_module, f"step-{step + 1}")  # after step + 1 logged steps

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_on_train_end:
            self.export(trainer, pl_module, "final")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class MetricsHistory(pl.Callback):
    """Keep every logged scalar metric per training step and append it to ``metrics.jsonl`` (for report plots).

    Each training row is ``{"step": logged step, "epoch": ..., "<metric>": value, ...}`` (the step loggers use:
    ``logged_step``) taken from
    ``trainer.callback_metrics`` after each batch, i.e. whatever the module logged with ``self.log``. Metrics logged
    during validation go to rows with ``"stage": "val"`` and are left out of the training rows (callback_metrics
    still holds their last value between validations). The file is rewritten from the kept history when fit starts,
    so a resumed run continues it. Only global rank 0 writes.

    Args:
        dirpath: Output folder; default: the logger's run folder (``trainer.log_dir``).
        filename: Name of the JSON-lines file.
        every_n_steps: Record a row each time the logged step passes a multiple of this.
        prefixes: Keep only metrics whose name starts with one of these (e.g. ``["objective/", "policy/"]``);
            None keeps all.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "metrics.jsonl",
        every_n_steps: int = 1,
        prefixes: list[str] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"MetricsHistory(every_n_steps={every_n_steps}): must be >= 1.")
        self.dirpath = dirpath
        self.filename = filename
        self.every_n_steps = every_n_steps
        self.prefixes = tuple(prefixes) if prefixes else None
        self.history: list[dict[str, Any]] = []
        self.path: Path | None = None
        self._val_keys: set[str] = set()
        self._before_val: dict[str, float] = {}
        self._last_step: int | None = None

    def _metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        out = {}
        for key, value in trainer.callback_metrics.items():
            if self.prefixes and not key.startswith(self.prefixes):
                continue
            scalar = _scalar(value)
            if scalar is not None:
                out[key] = scalar
        return out

    def _append(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        self.history.append(row)
        if trainer.is_global_zero and self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:  # line by line, so a crashed run keeps its curve
                handle.write(json.dumps(row) + "\n")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = _output_dir(trainer, self.dirpath) / self.filename
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in self.history)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = logged_step(trainer)
        if not _due(step, self._last_step, self.every_n_steps):
            return
        metrics = {k: v for k, v in self._metrics(trainer).items() if k not in self._val_keys}
        if not metrics:
            return
        self._last_step = step
        self._append(trainer, {"step": step, "epoch": trainer.current_epoch, **metrics})

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before_val = self._metrics(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # callback_metrics keeps training values through validation, so validation's own metrics are those that
        # appeared or changed since validation started (or were seen in an earlier validation).
        before = self._before_val
        metrics = {
            k: v for k, v in self._metrics(trainer).items() if k in self._val_keys or k not in before or before[k] != v
        }
        self._val_keys.update(metrics)
        if metrics:
            self._append(
                trainer, {"step": logged_step(trainer), "epoch": trainer.current_epoch, "stage": "val", **metrics}
            )

    def columns(self, stage: str = "train") -> dict[str, list[float]]:
        """The history as ``{metric: [values]}`` plus ``step``, for one stage (``train`` or ``val``)."""
        rows = [r for r in self.history if r.get("stage", "train") == stage]
        keys = sorted({k for r in rows for k in r if k != "stage"})
        return {k: [r.get(k, math.nan) for r in rows] for k in keys}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "val_keys": sorted(self._val_keys), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._val_keys = set(state_dict.get("val_keys", []))
        self._last_step = state_dict.get("last_step")


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().flatten().tolist()
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    return None


class SampleTable(pl.Callback):
    """Every N steps, write a few prompt / completion / score samples to ``samples.jsonl`` and ``samples.md``.

    Reads what ``training_step`` returns: a dict with ``completions`` (list of str) and, when present, ``prompts``
    (list of str; falls back to the batch's ``prompt`` field) and ``scores`` (tensor or list, one per completion).
    Steps whose output lacks ``completions`` are skipped (with one warning). Only global rank 0 writes, its own
    samples.

    Args:
        dirpath: Output folder; default: the logger's run folder (``trainer.log_dir``).
        every_n_steps: Write samples each time the logged step (an RL iteration) passes a multiple of this, and
            after the first batch (samples of the initial policy).
        num_samples: Samples per write (the first ones of the batch).
        max_chars: Cut longer texts in the markdown table (the jsonl keeps them whole).
        filename: Stem of the output files (``.jsonl`` and ``.md``).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_steps: int = 10,
        num_samples: int = 4,
        max_chars: int = 300,
        filename: str = "samples",
    ) -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(
                f"SampleTable: every_n_steps ({every_n_steps}) and num_samples ({num_samples}) must be >= 1."
            )
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.max_chars = max_chars
        self.filename = filename
        self.rows: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Files are rewritten from the kept rows: a fresh run starts new ones, a resumed run has exactly the rows of
        # the checkpoint it resumed from (none written after it, by a run that was then killed).
        if not trainer.is_global_zero:
            return
        folder = _output_dir(trainer, self.dirpath)
        for suffix in (".jsonl", ".md"):
            (folder / f"{self.filename}{suffix}").unlink(missing_ok=True)
        for step in sorted({row["step"] for row in self.rows}):
            self._write(folder, step, [row for row in self.rows if row["step"] == step])

    def _rows(self, outputs: Any, batch: Any, step: int) -> list[dict[str, Any]]:
        if not isinstance(outputs, Mapping):
            return []
        completions = _as_list(outputs.get("completions"))
        if not completions:
            return []
        prompts = _as_list(outputs.get("prompts"))
        if prompts is None and isinstance(batch, Mapping):
            prompts = _as_list(batch.get("prompt"))
        scores = _as_list(outputs.get("scores"))
        rows = []
        for i, completion in enumerate(completions[: self.num_samples]):
            row: dict[str, Any] = {"step": step}
            if prompts is not None and i < len(prompts):
                row["prompt"] = str(prompts[i])
            row["completion"] = str(completion)
            if scores is not None and i < len(scores):
                row["score"] = _scalar(scores[i])
            rows.append(row)
        return rows

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = logged_step(trainer)
        if not (self._last_step is None or _due(step, self._last_step, self.every_n_steps)):
            return
        rows = self._rows(outputs, batch, step)
        if not rows:
            if not self._warned:
                rank_zero_warn(
                    "SampleTable: training_step returned no 'completions' list; return a dict with 'completions' "
                    "(and 'prompts', 'scores') to get sample tables."
                )
                self._warned = True
            return
        self._last_step = step
        self.rows.extend(rows)
        if trainer.is_global_zero:
            self._write(_output_dir(trainer, self.dirpath), step, rows)

    def _write(self, folder: Path, step: int, rows: list[dict[str, Any]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{self.filename}.jsonl", "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        columns = [c for c in ("prompt", "completion", "score") if any(c in r for r in rows)]
        with open(folder / f"{self.filename}.md", "a", encoding="utf-8") as handle:
            handle.write(f"## step {step}\n\n" + markdown_table(rows, columns, max_chars=self.max_chars) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self.rows = list(state_dict.get("rows", []))
