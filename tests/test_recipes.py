"""Every shipped recipe parses against its entry point (``lit_rlhf.cli``); every tiny recipe runs end to end in
seconds. The pipeline recipes are tested in tests/pipeline/test_runner.py."""

from pathlib import Path

import pytest

from lit_rlhf.cli import STAGE_CLIS, StageCLI, _load, main, run_stage

RECIPES = Path(__file__).parents[1] / "recipes"
STAGE_RECIPES = sorted(p for stage in STAGE_CLIS for p in (RECIPES / stage).glob("*.yaml"))
RL_RECIPES = sorted((RECIPES / "rl").glob("*.yaml"))
RL_TINY = [path for path in RL_RECIPES if path.stem.endswith("_tiny")]


def test_every_stage_has_recipes():
    for stage in STAGE_CLIS:
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


def test_reward_rankings_tiny_recipe_fits(tmp_path):
    cli = run_stage(
        "reward",
        [
            "fit",
            "--config",
            str(RECIPES / "reward" / "minilm_rankings_tiny.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
    )
    assert cli.model.hparams.ranking_loss == "plackett_luce" and cli.trainer.global_step == 3
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["response_mask"].shape[1] == 3  # one row per prompt, its 3 responses side by side
    assert "val/accuracy" in cli.trainer.callback_metrics


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


def test_ilql_tiny_recipe_fits_and_exports_its_heads(tmp_path):
    config = str(RECIPES / "ilql" / "tiny.yaml")
    cli = run_stage("ilql", ["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.config.fit.data.tokenizer == "tiny-llama" and cli.trainer.global_step == 3
    losses = {"train/loss", "train/loss/q", "train/loss/v", "train/loss/cql", "train/loss/awac", "val/loss"}
    assert losses <= set(cli.trainer.callback_metrics)
    folder = cli.model.export(tmp_path / "hf")
    assert (folder / "ilql_heads.safetensors").is_file() and (folder / "config.json").is_file()


class ParseOnlyCLI(StageCLI):
    """The rl stage's CLI, stopped after parsing and validating the config (no model is loaded)."""

    def instantiate_classes(self) -> None:
        pass


def test_every_rl_algorithm_has_both_recipes():
    algorithms = ("ppo", "a2c", "nlpo", "rloo", "grpo", "reinforce_pp")
    assert {p.stem for p in RL_RECIPES} >= {f"{a}_{m}" for a in algorithms for m in ("tiny", "smollm2")}


@pytest.mark.parametrize("path", RL_RECIPES, ids=lambda p: p.stem)
def test_rl_recipe_parses(path):
    model, data, source = STAGE_CLIS["rl"]
    cli = ParseOnlyCLI(_load(model), _load(data), tokenizer_source=source, args=["--config", str(path)], run=False)
    config = cli.config
    assert config.data.tokenizer == config.model.policy  # linked, never set in the recipe
    assert config.model.algorithm.class_path.startswith("lit_rlhf.rl.")
    algorithm = config.model.algorithm.class_path.rsplit(".", 1)[1].lower()  # ReinforcePP -> reinforcepp
    assert path.stem.replace("_", "").startswith(algorithm)  # reinforce_pp_tiny, ppo_fsdp_8gpu
    if path.stem.endswith("_smollm2"):
        assert config.model.policy == "smollm2-135m-instruct" and config.model.lora is not None


@pytest.mark.parametrize("path", RL_TINY, ids=lambda p: p.stem)
def test_rl_tiny_recipe_runs(path, tmp_path):
    cli = run_stage("rl", ["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.iteration == cli.trainer.limit_train_batches == 3
    metrics = cli.trainer.callback_metrics
    assert "objective/score" in metrics and "val/score" in metrics and "policy/loss" in metrics
    assert ("ptx/loss" in metrics) == ("ptx" in path.stem)  # PPO-ptx's recipe mixes in its text, the others do not


def test_stage_commands_that_the_docs_list_run_from_any_folder(tmp_path, monkeypatch):
    # tmp_path is not the repository: the recipes' lit_rlhf/... data paths resolve inside the installed package.
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.enable_progress_bar", "false"]
    sft = RECIPES / "sft" / "tiny.yaml"
    fitted = run_stage("sft", ["fit", "--config", str(sft), *quiet])
    assert fitted.trainer.global_step > 0 and (tmp_path / "outputs" / "sft" / "tiny").is_dir()
    test_file = ["--data.test_path", "lit_rlhf/data/examples/sft_tiny.jsonl"]
    predicted = run_stage("sft", ["predict", "--config", str(sft), *test_file, *quiet])
    nll = [row for batch in predicted.trainer.predict_loop.predictions for row in batch["nll"].tolist()]
    assert len(nll) == 40 and all(value > 0 for value in nll)  # one completion NLL per example of the file
    rl = RECIPES / "rl" / "ppo_tiny.yaml"
    tested = run_stage("rl", ["test", "--config", str(rl), *quiet])
    assert {"test/score", "test/kl"} <= set(tested.trainer.callback_metrics)
    predicted = run_stage("rl", ["predict", "--config", str(rl), *quiet])
    assert predicted.trainer.predict_loop.predictions  # completions of the evaluation prompts


def test_rl_fit_is_bounded_by_iterations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.max_epochs", "5", "--trainer.limit_val_batches", "0", "--model.max_iterations", "2"]
    cli = run_stage("rl", ["fit", "--config", str(RECIPES / "rl" / "a2c_tiny.yaml"), *args])
    assert cli.model.iteration == 2 and cli.trainer.current_epoch < 5


def test_the_default_logger_is_tensorboard():
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    assert isinstance(L.Trainer(accelerator="cpu").logger, TensorBoardLogger)  # not the CSV fallback


def test_dpo_tiny_recipe_fits_with_causal_lm_batches(tmp_path):
    # The dpo stage sets data.encoding to causal_lm itself: the recipe does not need to.
    cli = run_stage(
        "dpo", ["fit", "--config", str(RECIPES / "dpo" / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    )
    assert cli.datamodule.encoding == "causal_lm" and cli.trainer.global_step == 3
    assert 0.0 <= float(cli.trainer.callback_metrics["train/rewards/accuracy"]) <= 1.0
