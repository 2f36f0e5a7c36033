"""Helpers shared by the pipeline tests (no tests here): the recipes, running the tiny one, stage markers."""

from __future__ import annotations

from pathlib import Path

from lit_rlhf.pipeline import PipelineConfig, build_parser, main
from lit_rlhf.pipeline.config import from_namespace

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
