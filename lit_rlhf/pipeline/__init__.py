"""The main job: the whole RLHF pipeline (collect → reward model → RL → evaluate → report) as one command,
``lit-rlhf pipeline --config recipes/pipeline/demo.yaml``."""

from lit_rlhf.pipeline.config import (
    CollectConfig,
    EvaluateConfig,
    PipelineConfig,
    ReportConfig,
    RewardConfig,
    RLConfig,
)
from lit_rlhf.pipeline.runner import STAGES, build_parser, main, run_pipeline

__all__ = [
    "STAGES",
    "CollectConfig",
    "EvaluateConfig",
    "PipelineConfig",
    "RLConfig",
    "ReportConfig",
    "RewardConfig",
    "build_parser",
    "main",
    "run_pipeline",
]
