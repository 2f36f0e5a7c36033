"""``lit-rlhf pipeline``: parse the config, pick the stages, skip those whose outputs are up to date, run the rest."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, set_parsing_settings

from lit_rlhf.pipeline.collect import run_collect
from lit_rlhf.pipeline.common import RunPaths, read_json, write_json
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


def _marker(paths: RunPaths, stage: str) -> dict[str, Any] | None:
    path = paths.marker(stage)
    return read_json(path) if path.exists() else None


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
    paths = RunPaths(Path(config.output_dir or Path("outputs") / config.name))
    paths.root.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for stage in stages:
        inputs = {}
        for needed in INPUTS[stage]:
            marker = _marker(paths, needed)
            if marker is None:
                raise FileNotFoundError(
                    f"Stage '{stage}' needs the outputs of '{needed}', which has not run in {paths.root} "
                    f"({paths.marker(needed)} is missing): run `lit-rlhf pipeline {needed} --config ...` first, or "
                    "the whole pipeline."
                )
            inputs[needed] = marker["run_id"]
        key = fingerprint(stage, settings, inputs)
        previous = _marker(paths, stage)
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
        paths.marker(stage).unlink(missing_ok=True)  # a failed run must not look finished
        for output in paths.outputs(stage):
            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink(missing_ok=True)
        start = time.perf_counter()
        summary = STAGES[stage](config, paths)
        seconds = time.perf_counter() - start
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
    output_dir = Path(config.output_dir or Path("outputs") / config.name)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dumped, encoding="utf-8")
    # Harmless notices that would bury the progress output of a CPU run.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        status = run_pipeline(config, settings, stages, force=raw.force)
    finally:
        torch.set_num_threads(threads)
    ran = [s for s, v in status.items() if v == "ran"]
    print(
        f"lit-rlhf pipeline: {len(ran)} stage(s) ran, {len(status) - len(ran)} skipped, "
        f"{time.perf_counter() - start:.1f} s. Report: {output_dir / 'report.md'}"
    )
