"""Every shipped recipe parses against its entry point; every tiny recipe runs end to end in seconds."""

from pathlib import Path

import pytest

from lit_rlhf.cli import STAGES, main, run_stage

RECIPES = Path(__file__).parents[1] / "recipes"
STAGE_RECIPES = sorted(p for stage in STAGES for p in (RECIPES / stage).glob("*.yaml"))


def test_every_stage_has_recipes():
    for stage in ("sft", "reward"):
        assert list((RECIPES / stage).glob("*.yaml")), f"no recipe for stage {stage}"


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_prints_config(recipe, capsys):
    stage = recipe.parent.name
    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage, ["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "trainer:" in printed and "data:" in printed


def test_help_lists_documented_arguments(capsys):
    with pytest.raises(SystemExit):
        run_stage("reward", ["fit", "--help"])
    text = capsys.readouterr().out
    assert "--model.backbone" in text
    assert "Bundled name, hub id or path of the trunk" in text


def test_top_level_usage(capsys):
    main([])
    assert "lit-rlhf reward fit" in capsys.readouterr().out


def test_unknown_stage_names_the_choices():
    with pytest.raises(SystemExit, match="unknown stage 'rm'"):
        main(["rm", "fit"])


def _fit_tiny(stage: str, recipe: str, root: Path, *extra: str) -> None:
    config = str(RECIPES / stage / recipe)
    run_stage(stage, ["fit", "--config", config, "--trainer.default_root_dir", str(root), *extra])


def test_sft_tiny_recipe_runs(tmp_path):
    _fit_tiny("sft", "tiny.yaml", tmp_path)
    assert list(tmp_path.rglob("config.yaml")), "LightningCLI saves the resolved config beside the logs"


def test_reward_tiny_recipe_fits_then_tests_from_checkpoint(tmp_path, capsys):
    _fit_tiny("reward", "minilm_tiny.yaml", tmp_path, "--trainer.enable_checkpointing", "true")
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    example = RECIPES.parent / "lit_rlhf" / "data" / "examples" / "preferences_tiny.jsonl"
    run_stage(
        "reward",
        [
            "test",
            "--config",
            str(RECIPES / "reward" / "minilm_tiny.yaml"),
            "--data.train_path",
            "null",
            "--data.test_path",
            str(example),
            "--ckpt_path",
            str(ckpt),
            "--trainer.default_root_dir",
            str(tmp_path / "test"),
        ],
    )
    assert "test/accuracy" in capsys.readouterr().out
