"""Helpers shared by the pipeline tests (no tests here): the recipes, running the tiny one, stage markers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from lit_rlhf.pipeline import PipelineConfig, build_parser, main
from lit_rlhf.pipeline.config import from_namespace
from lit_rlhf.rewards import CharacterShareReward

RECIPES = sorted((Path(__file__).parents[2] / "recipes" / "pipeline").glob("*.yaml"))
TINY = Path(__file__).parents[2] / "recipes" / "pipeline" / "tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGE_NAMES = ("collect", "reward", "rl", "evaluate", "report")


def run(*args: str) -> None:
    """The tiny recipe through ``lit-rlhf pipeline`` with ``args`` added."""
    main(["--config", str(TINY), "--progress_bar", "false", *args])


def parse(*args: str) -> PipelineConfig:
    """The typed configuration of a command line, parsed and instantiated as ``lit-rlhf pipeline`` does."""
    parser = build_parser()
    return from_namespace(parser.instantiate_classes(parser.parse_args(list(args))))


def stamps(root: Path) -> dict[str, float]:
    """Modification time of each stage's marker: it changes exactly when the stage runs."""
    return {stage: (root / "stages" / f"{stage}.json").stat().st_mtime_ns for stage in STAGE_NAMES}


class DieOnCall(CharacterShareReward):
    """The share of "a" in each completion, as a reward that kills its own process (SIGKILL) at its ``call``-th call
    unless ``marker`` exists, and creates ``marker`` first: a crash in the middle of the RL stage, once."""

    def __init__(self, call: int, marker: str) -> None:
        super().__init__("a")
        self.call, self.marker, self.calls = call, Path(marker), 0

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.call and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(prompts, completions)


class Explode(CharacterShareReward):
    """A reward that fails at its first call: a stage that breaks after it started."""

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        raise RuntimeError("the reward service is down")


def pipeline_in_subprocess(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``lit-rlhf pipeline`` on the tiny recipe in its own process (so it can be killed), with ``args`` added."""
    command = [sys.executable, "-m", "lit_rlhf.cli", "pipeline", "--config", str(TINY), "--progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)
