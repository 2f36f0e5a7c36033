"""``lit-rlhf pipeline``: parse the config, pick the stages, skip those whose outputs are up to date, run the rest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, set_parsing_settings

from lit_rlhf.pipeline.collect import run_collect
from lit_rlhf.pipeline.common import OUTPUTS, PARTIAL, RunPaths, read_json, write_json
from lit_rlhf.pipeline.config import PipelineConfig, add_arguments, from_namespace, validate
from lit_rlhf.pipeline.evaluate import run_evaluate
from lit_rlhf.pipeline.report import run_report
from lit_rlhf.pipeline.reward_model import run_reward
from lit_rlhf.pipeline.rl import run_rl

StageFn = Callable[[PipelineConfig, RunPaths], dict[str, Any]]

STAGES: dict[str, StageFn] = {
    "collect": run_collect,
    "reward": run_reward,
    "rl": run_rl,
    "evaluate": run_evaluate,
    "report": run_report,
}
"""The stages in the order they run."""

INPUTS: dict[str, tuple[str, ...]] = {
    "collect": (),
    "reward": ("collect",),
    "rl": ("reward",),
    "evaluate": ("reward", "rl"),
    "report": ("collect", "reward", "rl", "evaluate"),
}
"""The stages whose outputs each stage reads."""

# Settings that change no stage's outputs, left out of the fingerprints.
_NOT_FINGERPRINTED = {"name", "output_dir", "progress_bar", "num_threads"}

DESCRIPTION = """The whole RLHF recipe on embedded defaults, offline: collect preference pairs from the policy's own
samples with a simulated annotator -> train a reward model -> RL (PPO + LoRA) against it -> evaluate every checkpoint
on held-out prompts -> <output_dir>/report.md.

Run one stage with `lit-rlhf pipeline STAGE --config FILE`, several with `--stages collect,reward`. A stage is
skipped when its outputs exist and were made with the same settings from the same inputs (see
<output_dir>/stages/*.json); `--force` redoes the chosen stages, and every stage after one that ran is redone too."""


def build_parser() -> ArgumentParser:
    """The pipeline's parser: every ``PipelineConfig`` field (docstrings as help) plus the run options."""
    # Field docstrings become --help text; jsonargparse reads them only when asked.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="lit-rlhf pipeline", description=DESCRIPTION, exit_on_error=True)
    parser.add_argument(
        "stage",
        nargs="?",
        default=None,
        help=f"Run only this stage: one of {', '.join(STAGES)} (default: all, or those in --stages).",
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A pipeline recipe (YAML), e.g. recipes/pipeline/demo.yaml."
    )
    add_arguments(parser)
    parser.add_argument(
        "--stages",
        type=str | None,
        default=None,
        help="Comma-separated stages to run, e.g. collect,reward (default: all).",
    )
    parser.add_argument(
        "--force", action=ActionYesNo, default=False, help="Redo the chosen stages even when they are up to date."
    )
    return parser


class OutputInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


@contextmanager
def lock_output(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this run: ``folder/.lock``, locked with ``flock`` and naming this process.

    A second run into the same folder fails at once with the holder's process id, host and command. The operating
    system releases the lock when its process ends, even by ``kill -9``, so a lock left by a dead run is simply taken
    over (the file stays, unlocked).
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held open for as long as the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "an unknown process"
        handle.close()
        raise OutputInUse(
            f"{folder} is in use by another pipeline run ({holder}); wait for it to finish, or give this run its "
            "own --output_dir."
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def output_folder(config: PipelineConfig) -> Path:
    """The run's output folder: ``output_dir``, else ``outputs/<name>``."""
    return Path(config.output_dir or Path("outputs") / config.name)


def select_stages(stage: str | None, stages: str | None) -> list[str]:
    """The chosen stages in pipeline order; an unknown name is an error that lists the known ones."""
    if stage is not None and stages is not None:
        raise ValueError("Give a STAGE or --stages, not both.")
    names = [stage] if stage is not None else [s.strip() for s in (stages or "").split(",") if s.strip()]
    if not names or names == ["all"]:
        return list(STAGES)
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}: choose from {', '.join(STAGES)} (or all).")
    return [name for name in STAGES if name in names]


def fingerprint(stage: str, settings: dict[str, Any], input_runs: dict[str, str]) -> str:
    """Hash of what a stage's outputs depend on: the shared settings, its own section and its inputs' run ids."""
    shared = {k: v for k, v in settings.items() if k not in STAGES and k not in _NOT_FINGERPRINTED}
    payload = {"shared": shared, "stage": settings.get(stage), "inputs": input_runs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _marker(paths: RunPaths, stage: str, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """A stage's marker, or None when it has not finished; a marker that cannot be read (torn by a crash, edited by
    hand) counts as not finished, so the stage runs again."""
    path = paths.marker(stage)
    if not path.exists():
        return None
    try:
        marker = read_json(path)
        if isinstance(marker, dict) and {"run_id", "fingerprint", "finished", "seconds"} <= set(marker):
            return marker
        problem = "it lacks the fields a finished stage writes"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"it is not readable JSON ({error})"
    log(f"[{stage}] {path}: {problem}; the stage counts as not done")
    return None


def _begin(paths: RunPaths, stage: str, key: str, log: Callable[[str], None]) -> None:
    """Prepare the stage's partial folder: kept when an interrupted run of the same settings left it (the RL stage
    resumes from it), else emptied."""
    partial = paths.partial(stage)
    stamp = partial / "fingerprint.json"
    if partial.exists():
        try:
            same = read_json(stamp).get("fingerprint") == key
        except (OSError, ValueError, AttributeError):
            same = False
        if same:
            log(f"[{stage}] continuing the interrupted run in {partial}")
            return
        shutil.rmtree(partial)
    write_json(stamp, {"fingerprint": key})


def _commit(paths: RunPaths, stage: str) -> None:
    """Put a finished stage's outputs in place of the old ones. Its marker goes first, so a crash half-way leaves
    the stage "not done" (never done with half-replaced outputs); the old outputs are removed last."""
    paths.marker(stage).unlink(missing_ok=True)
    partial, trash = paths.partial(stage), paths.root / PARTIAL / f"{stage}.old"
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir(parents=True)
    for name in OUTPUTS[stage]:
        if (paths.root / name).exists():
            (paths.root / name).rename(trash / name)
        if (partial / name).exists():
            (partial / name).rename(paths.root / name)
    shutil.rmtree(partial)
    shutil.rmtree(trash)


def run_pipeline(
    config: PipelineConfig,
    settings: dict[str, Any],
    stages: list[str],
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run ``stages`` in order, skipping those that are up to date. Returns ``{stage: "ran" | "skipped"}``.

    Args:
        config: The parsed configuration.
        settings: The same configuration as plain data (what the fingerprints hash).
        stages: Stage names, in pipeline order.
        force: Redo the stages even when up to date.
        log: Where progress lines go.
    """
    paths = RunPaths(output_folder(config))
    paths.root.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for stage in stages:
        inputs = {}
        for needed in INPUTS[stage]:
            marker = _marker(paths, needed, log)
            if marker is None:
                raise FileNotFoundError(
                    f"Stage '{stage}' needs the outputs of '{needed}', which has not run in {paths.root} "
                    f"({paths.marker(needed)} is missing): run `lit-rlhf pipeline {needed} --config ...` first, or "
                    "the whole pipeline."
                )
            inputs[needed] = marker["run_id"]
        key = fingerprint(stage, settings, inputs)
        previous = _marker(paths, stage, log)
        upstream_ran = any(status.get(s) == "ran" for s in INPUTS[stage])
        if previous is not None and previous.get("fingerprint") == key and not force and not upstream_ran:
            log(f"[{stage}] up to date, skipped (ran {previous['finished']}, {previous['seconds']:.0f} s)")
            status[stage] = "skipped"
            continue
        if force:
            reason = "forced"
        elif previous is None:
            reason = "no previous run"
        elif upstream_ran:
            reason = "an input stage ran again"
        else:
            reason = "settings or inputs changed"
        log(f"[{stage}] running ({reason}) -> {paths.root}")
        # The stage writes into .partial/<stage>: a failure leaves the previous outputs (and their marker) as they were.
        _begin(paths, stage, key, log)
        start = time.perf_counter()
        summary = STAGES[stage](config, paths.staged(stage))
        seconds = time.perf_counter() - start
        _commit(paths, stage)
        write_json(
            paths.marker(stage),
            {
                "stage": stage,
                "run_id": uuid.uuid4().hex,
                "fingerprint": key,
                "inputs": inputs,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": seconds,
                "summary": summary,
            },
        )
        log(f"[{stage}] done in {seconds:.1f} s")
        status[stage] = "ran"
    return status


def main(argv: list[str] | None = None) -> None:
    """``lit-rlhf pipeline [STAGE] --config FILE [--output_dir DIR] [--stages a,b] [--force]``."""
    parser = build_parser()
    raw = parser.parse_args(argv)
    try:
        stages = select_stages(raw.stage, raw.stages)
    except ValueError as err:
        parser.error(str(err))
    config = from_namespace(parser.instantiate_classes(raw))
    try:
        validate(config)
    except ValueError as err:
        parser.error(str(err))
    config_only = raw.clone()
    for key in ("stage", "stages", "force", "config", "__path__"):
        config_only.pop(key, None)
    dumped = parser.dump(config_only, skip_check=True)
    settings = yaml.safe_load(dumped)
    output_dir = output_folder(config)
    # Harmless notices that would bury the progress output of a CPU run.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        with lock_output(output_dir):
            (output_dir / "config.yaml").write_text(dumped, encoding="utf-8")
            status = run_pipeline(config, settings, stages, force=raw.force)
    except OutputInUse as error:
        raise SystemExit(f"lit-rlhf pipeline: {error}") from None
    finally:
        torch.set_num_threads(threads)
    ran = [s for s, v in status.items() if v == "ran"]
    print(
        f"lit-rlhf pipeline: {len(ran)} stage(s) ran, {len(status) - len(ran)} skipped, "
        f"{time.perf_counter() - start:.1f} s. Report: {output_dir / 'report.md'}"
    )
