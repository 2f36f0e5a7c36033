"""The pipeline's configuration (``lit_rlhf.pipeline.config``): the training sections are the stage modules' own
arguments (every option reachable, the same defaults, a recipe's model: block pastes into rl:), their Trainer options
are typed, and everything is checked before the first stage runs, with the user's key names."""

import inspect

import pytest
import yaml

from lit_rlhf.pipeline import main
from lit_rlhf.pipeline.config import validate
from lit_rlhf.reward import RewardModelModule
from lit_rlhf.rewards import CharacterShareReward
from lit_rlhf.rl import A2C, PPO, RLHFModule
from tests.pipeline.support import TINY, parse

RL_RECIPES = TINY.parents[1] / "rl"


def defaults(cls: type) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_every_module_argument_is_a_key_of_its_section_with_the_modules_default():
    config = parse()
    for section, module in ((config.rl, RLHFModule), (config.reward, RewardModelModule)):
        assert set(inspect.signature(module).parameters) - {"policy"} <= set(section.model)
        for name, default in defaults(module).items():
            if name in ("rollout_seed", "max_iterations"):  # derived: the pipeline's seed, rl.iterations
                continue
            if isinstance(default, (int, float, str, bool, type(None))):
                assert section.model[name] == default, (module.__name__, name)
    assert (config.rl.model["rollout_seed"], config.rl.model["max_iterations"]) == (0, config.rl.iterations)
    assert parse("--seed", "3", "--rl.iterations", "7").rl.model["max_iterations"] == 7


@pytest.mark.parametrize("recipe", ["ppo_tiny", "a2c_tiny", "nlpo_tiny", "grpo_tiny", "rloo_tiny", "ppo_smollm2"])
def test_a_recipes_model_block_pastes_into_the_rl_section(recipe, tmp_path):
    pipeline = yaml.safe_load(TINY.read_text())
    model = yaml.safe_load((RL_RECIPES / f"{recipe}.yaml").read_text())["model"]
    pipeline["policy"] = model["policy"]
    pipeline["rl"] = {**model, "iterations": 3, "batch_size": 2}
    path = tmp_path / "pasted.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    config = parse("--config", str(path))
    assert type(config.rl.model["algorithm"]).__name__ == model["algorithm"]["class_path"].rsplit(".", 1)[1]
    assert config.rl.model["reward"] is not None  # the recipe's own reward, used instead of the learned one
    assert config.rl.model["max_iterations"] == 3


def test_the_stage_trainer_options_are_typed_with_the_pipelines_defaults(tmp_path):
    config = parse("--rl.trainer.max_steps", "5")
    assert config.rl.trainer["max_steps"] == 5 and config.rl.trainer["devices"] == 1
    assert config.rl.trainer["logger"] is False and config.rl.trainer["limit_val_batches"] == 0
    assert config.reward.trainer["limit_val_batches"] is None  # the reward stage validates on held-out pairs
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("rl:\n  trainer:\n    max_step: 5\n")
    with pytest.raises(SystemExit):  # an error, not a silent no-op
        parse("--config", str(misspelt))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rl.learning_rate", "-0.001"], "rl.learning_rate must be > 0, got -0.001"),
        (["--rl.iterations", "0"], "rl.iterations must be >= 1, got 0"),
        (["--rl.algorithm", "lit_rlhf.rl.A2C", "--rl.value_model", "none"], "set rl.value_model to"),
        (["--rl.algorithm", "lit_rlhf.rl.RLOO"], "RLOO compares completions of the same prompt: set rl.generation.num"),
        (["--reward.learning_rate", "0"], "reward.learning_rate must be > 0"),
        (["--rl.ptx_coef", "0.5"], "rl.ptx_coef > 0 needs text to keep the likelihood of: set rl.ptx_path."),
        (["--reward.warmup_ratio", "1.5"], "reward.warmup_ratio must be in [0, 1)"),
        (["--rl.load_in_4bit", "true", "--rl.lora", "null"], "set rl.lora to train adapters"),
        (["--rl.policy", "smollm2-135m-instruct"], "rl.policy (smollm2-135m-instruct) is not the pipeline's policy"),
        (["--collect.generation.num_samples", "1"], "collect.generation.num_samples must be >= 2"),
        (["--rl.trainer.accelerator", "gpu"], "rl.trainer:"),
        (["--evaluate.best_of_n", "[4, 0]"], "evaluate.best_of_n must hold distinct n >= 1, got [4, 0]"),
        (["--evaluate.best_of_n", "[4, 4]"], "evaluate.best_of_n must hold distinct n >= 1, got [4, 4]"),
    ],
)
def test_a_bad_setting_stops_the_pipeline_before_any_stage_runs(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(TINY), "--output_dir", str(tmp_path / "run"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages").exists()


def test_the_section_builds_the_module_it_describes():
    config = parse("--config", str(TINY))
    assert isinstance(config.rl.model["algorithm"], PPO) and config.rl.model["value_model"] == "shared"
    module = RLHFModule(**{**config.rl.model, "policy": config.policy, "reward": CharacterShareReward()})
    assert module.algorithm.schedule.epochs == 1 and module.models.value_head is not None
    assert not isinstance(module.algorithm, A2C)


@pytest.mark.parametrize("algorithm", ["GRPO", "RLOO", "ReinforcePP"])
def test_a_critic_free_algorithm_replaces_ppo_without_a_value_model_edit(algorithm):
    # the tiny recipe asks for value_model: shared (PPO's critic); the critic-free algorithms get none
    config = parse(
        "--config", str(TINY), "--rl.algorithm", f"lit_rlhf.rl.{algorithm}", "--rl.generation.num_samples", "2"
    )
    assert type(config.rl.model["algorithm"]).__name__ == algorithm and config.rl.model["value_model"] is None
    validate(config)
    module = RLHFModule(**{**config.rl.model, "policy": config.policy, "reward": CharacterShareReward()})
    assert module.models.critic is None
