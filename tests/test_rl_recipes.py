"""Every RL recipe parses against the `lit-rlhf rl` LightningCLI; the tiny ones run end to end in seconds."""

from pathlib import Path

import pytest

from lit_rlhf.cli import STAGES, StageCLI, _load

RECIPES = sorted((Path(__file__).parents[1] / "recipes" / "rl").glob("*.yaml"))
TINY = [path for path in RECIPES if path.stem.endswith("_tiny")]


class ParseOnlyCLI(StageCLI):
    """The rl stage's CLI, stopped after parsing and validating the config (no model is loaded)."""

    def instantiate_classes(self) -> None:
        pass


def test_every_algorithm_has_both_recipes():
    assert {p.stem for p in RECIPES} >= {f"{a}_{m}" for a in ("ppo", "a2c", "nlpo") for m in ("tiny", "smollm2")}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(path):
    model, data, source = STAGES["rl"]
    cli = ParseOnlyCLI(_load(model), _load(data), tokenizer_source=source, args=["--config", str(path)], run=False)
    config = cli.config
    assert config.data.tokenizer == config.model.policy  # linked, never set in the recipe
    assert config.model.algorithm.class_path.startswith("lit_rlhf.rl.")
    assert path.stem.split("_")[0].upper() == config.model.algorithm.class_path.rsplit(".", 1)[1]
    if path.stem.endswith("_smollm2"):
        assert config.model.policy == "smollm2-135m-instruct" and config.model.lora is not None


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_recipe_runs(path, tmp_path):
    from lit_rlhf.cli import run_stage

    cli = run_stage("rl", ["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.iteration == cli.trainer.limit_train_batches == 3
    metrics = cli.trainer.callback_metrics
    assert "objective/score" in metrics and "val/score" in metrics and "policy/loss" in metrics
