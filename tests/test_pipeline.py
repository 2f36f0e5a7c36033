"""The pipeline command: recipes parse, the tiny recipe runs end to end, stages skip when up to date, and the small
pure helpers behind collection, evaluation and stage selection."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lit_rlhf.data import read_preferences
from lit_rlhf.judges import BradleyTerryAnnotator, VaderJudge
from lit_rlhf.pipeline import PipelineConfig, build_parser, main
from lit_rlhf.pipeline.collect import all_pairs, split_prompts
from lit_rlhf.pipeline.common import annotator_for, fresh, gold_judge_for
from lit_rlhf.pipeline.evaluate import elo_matches, outcomes
from lit_rlhf.pipeline.reward_model import pair_accuracy
from lit_rlhf.pipeline.runner import STAGES, _config_from, fingerprint, select_stages

RECIPES = sorted((Path(__file__).parents[1] / "recipes" / "pipeline").glob("*.yaml"))
TINY = Path(__file__).parents[1] / "recipes" / "pipeline" / "tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> None:
    main(["--config", str(TINY), "--progress_bar", "false", *args])


def stamps(root: Path) -> dict[str, float]:
    """Modification time of each stage's marker: it changes exactly when the stage runs."""
    return {stage: (root / "stages" / f"{stage}.json").stat().st_mtime_ns for stage in STAGES}


# --- recipes and the command line -------------------------------------------------------------------------------


def test_there_are_three_recipes():
    assert {p.stem for p in RECIPES} == {"demo", "quick", "tiny"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert f"name: {recipe.stem}" in printed
    assert "class_path: lit_rlhf.judges.BradleyTerryAnnotator" in printed


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates(recipe):
    parser = build_parser()
    config = _config_from(parser.instantiate_classes(parser.parse_args(["--config", str(recipe)])))
    assert isinstance(config, PipelineConfig)
    assert isinstance(annotator_for(config), BradleyTerryAnnotator)
    assert isinstance(gold_judge_for(config), VaderJudge)
    assert config.rl.iterations >= 1 and config.collect.generation.num_samples >= 2


def test_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "every pair of a prompt's K completions is labelled" in out
    assert "--rl.iterations" in out and "--force" in out


def test_a_plain_judge_becomes_a_noiseless_annotator():
    parser = build_parser()
    raw = parser.parse_args(["--collect.annotator", "lit_rlhf.rewards.SentimentReward"])
    config = _config_from(parser.instantiate_classes(raw))
    annotator = annotator_for(config)
    assert isinstance(annotator, BradleyTerryAnnotator) and annotator.temperature == 0.0
    assert gold_judge_for(config) is not None
    (preference,) = annotator.compare(["p"], ["I hate this."], ["What a lovely day!"])
    assert preference.chosen == "What a lovely day!"


def test_unknown_stage_is_an_error_that_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(TINY), "--stages", "collect,train"])
    assert "collect, reward, rl, evaluate, report" in capsys.readouterr().err


# --- the tiny recipe end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "tiny"
    run("--output_dir", str(root))
    return root


def test_tiny_pipeline_writes_preferences_in_the_data_module_format(tiny_run):
    pairs = read_preferences(tiny_run / "collect" / "train.jsonl")
    held_out = read_preferences(tiny_run / "collect" / "val.jsonl")
    # 8 prompts × 3 samples: 3 pairs per prompt, 2 of the 8 prompts (val_fraction 0.25) held out.
    assert len(pairs) + len(held_out) == 24
    assert len(held_out) == 6
    assert {p.prompt for p in pairs}.isdisjoint({p.prompt for p in held_out})


def test_tiny_pipeline_writes_report_plots_and_numbers(tiny_run):
    report = (tiny_run / "report.md").read_text()
    for heading in (
        "Summary",
        "Preference collection",
        "Reward model",
        "RL training",
        "Evaluation",
        "Before and after",
    ):
        assert heading in report
    for plot in ("rl_curves.png", "gold_vs_proxy.png"):
        assert f"(plots/{plot})" in report
        assert (tiny_run / "plots" / plot).read_bytes()[:8] == PNG_MAGIC
    # One table row per checkpoint (initial, iter 1, iter 2), each cell a number.
    for checkpoint in ("initial", "iter 1", "iter 2"):
        row = re.search(rf"^\| {checkpoint} \|(.*)\|$", report, re.MULTILINE)
        assert row is not None, checkpoint
        cells = [c.strip() for c in row.group(1).split("|")]
        assert len(cells) == 9 and all(re.fullmatch(r"-?\d+(\.\d+)?", c) for c in cells), cells

    results = json.loads((tiny_run / "evaluate" / "results.json").read_text())
    assert [row["iteration"] for row in results["checkpoints"]] == [0, 1, 2]
    assert 0.0 <= results["win_rate"] <= 1.0
    assert results["wins"] + results["ties"] + results["losses"] == 4 * 2
    assert results["elo"]["initial"] == pytest.approx(1000.0)
    for row in results["checkpoints"]:
        for key in ("gold_reward", "proxy_reward", "kl", "ref_perplexity", "distinct_1", "distinct_2", "length"):
            assert math.isfinite(row[key]), (row["checkpoint"], key)
    assert results["checkpoints"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the initial policy is the reference

    history = [json.loads(line) for line in (tiny_run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in history] == [0, 1]
    assert (tiny_run / "rl" / "hf" / "final" / "config.json").exists()
    assert (tiny_run / "reward" / "model" / "config.json").exists()
    assert (tiny_run / "config.yaml").read_text().startswith("name: tiny")


def test_stages_skip_when_up_to_date_and_force_redoes_them(tiny_run):
    before = stamps(tiny_run)
    run("--output_dir", str(tiny_run))
    assert stamps(tiny_run) == before

    run("report", "--output_dir", str(tiny_run), "--force")
    after = stamps(tiny_run)
    assert after["report"] != before["report"]
    assert {s: after[s] for s in STAGES if s != "report"} == {s: before[s] for s in STAGES if s != "report"}

    # A changed evaluation setting redoes evaluate, and the report that reads it, but nothing upstream.
    run("--output_dir", str(tiny_run), "--evaluate.samples_per_prompt", "1")
    changed = stamps(tiny_run)
    assert [s for s in STAGES if changed[s] != after[s]] == ["evaluate", "report"]
    results = json.loads((tiny_run / "evaluate" / "results.json").read_text())
    assert results["wins"] + results["ties"] + results["losses"] == 4


def test_a_stage_without_its_inputs_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs the outputs of 'reward'"):
        run("rl", "--output_dir", str(tmp_path))


# --- helpers ----------------------------------------------------------------------------------------------------


def test_all_pairs():
    assert all_pairs(2) == [(0, 1)]
    assert all_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(all_pairs(4)) == 6  # 4 · 3 / 2


def test_split_prompts_holds_out_a_seeded_share():
    prompts = [f"p{i}" for i in range(10)]
    held = split_prompts(prompts, 0.2, seed=0)
    assert len(held) == 2 and held <= set(prompts)
    assert split_prompts(prompts, 0.2, seed=0) == held
    assert split_prompts(prompts, 0.0, seed=0) == set()
    assert len(split_prompts(["a", "b"], 0.01, seed=0)) == 1  # at least one ...
    assert len(split_prompts(["a", "b"], 0.9, seed=0)) == 1  # ... and never all
    with pytest.raises(ValueError, match="val_fraction"):
        split_prompts(prompts, 1.0, seed=0)


def test_pair_accuracy_counts_ties_as_wrong():
    # chosen beats rejected in rows 0 and 2, ties in row 1, loses in row 3: 2 of 4.
    assert pair_accuracy(torch.tensor([1.0, 0.5, 2.0, 0.0]), torch.tensor([0.0, 0.5, 1.0, 1.0])) == 0.5


def test_outcomes_and_elo_matches():
    # higher wins (1), equal ties (0.5), lower loses (0)
    assert outcomes(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.5])).tolist() == [1.0, 0.5, 0.0]
    gold = {"initial": torch.tensor([0.0, 0.5]), "iter 1": torch.tensor([0.5, 0.5]), "iter 2": torch.tensor([1.0, 0.0])}
    matches = elo_matches(gold)
    # 3 pairs of checkpoints × 2 matched samples
    assert matches == [
        ("initial", "iter 1", 0.0),
        ("initial", "iter 1", 0.5),
        ("initial", "iter 2", 0.0),
        ("initial", "iter 2", 1.0),
        ("iter 1", "iter 2", 0.0),
        ("iter 1", "iter 2", 1.0),
    ]


def test_select_stages():
    assert select_stages(None, None) == list(STAGES)
    assert select_stages("rl", None) == ["rl"]
    assert select_stages(None, "report,collect") == ["collect", "report"]  # always in pipeline order
    with pytest.raises(ValueError, match="not both"):
        select_stages("rl", "collect")
    with pytest.raises(ValueError, match="Unknown stage"):
        select_stages(None, "collect,sft")


def test_fingerprint_follows_settings_and_inputs():
    settings = {"policy": "tiny-llama", "name": "a", "rl": {"iterations": 2}, "evaluate": {"num_prompts": 4}}
    base = fingerprint("rl", settings, {"reward": "run-1"})
    assert fingerprint("rl", {**settings, "name": "b", "output_dir": "/x"}, {"reward": "run-1"}) == base
    assert fingerprint("rl", {**settings, "evaluate": {"num_prompts": 8}}, {"reward": "run-1"}) == base
    assert fingerprint("rl", {**settings, "rl": {"iterations": 3}}, {"reward": "run-1"}) != base
    assert fingerprint("rl", {**settings, "policy": "other"}, {"reward": "run-1"}) != base
    assert fingerprint("rl", settings, {"reward": "run-2"}) != base


def test_fresh_builds_lazy_defaults_anew():
    config = PipelineConfig()
    first, second = fresh(config.rl.kl), fresh(config.rl.kl)
    assert first is not second and first.coef == second.coef == 0.1
    first.update(100.0, n_steps=1000)
    assert fresh(config.rl.kl).coef == 0.1
    judge = VaderJudge()
    assert fresh(judge) is judge


def test_precision_reaches_the_trainers_and_collect_sampling():
    from lit_rlhf.pipeline.common import make_trainer, sampler, sampling_precision
    from lit_rlhf.rl import GenerationOptions

    config = PipelineConfig(policy="tiny-llama", precision="bf16-mixed")
    assert make_trainer(config, {}).precision == "bf16-mixed"
    assert make_trainer(config, {"precision": "32-true"}).precision == "32-true"  # a stage's trainer override wins
    module = sampler(config, GenerationOptions(max_new_tokens=4))
    with sampling_precision(config, module):
        assert torch.is_autocast_enabled("cpu")
        ids = module.tokenizer(["ab"], return_tensors="pt")["input_ids"]
        assert module.policy(input_ids=ids).logits.dtype == torch.float32  # the head stays float32
    full = PipelineConfig(policy="tiny-llama")
    with sampling_precision(full, sampler(full, GenerationOptions(max_new_tokens=4))):
        assert not torch.is_autocast_enabled("cpu")


def test_quick_recipe_end_to_end_with_the_real_models(tmp_path):
    # The smoke test of recipes/pipeline/quick.yaml: SmolLM2-135M-Instruct and MiniLM through all five stages, offline.
    quick = TINY.parent / "quick.yaml"
    main(["--config", str(quick), "--progress_bar", "false", "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert [row["checkpoint"] for row in results["checkpoints"]][0] == "initial" and len(results["checkpoints"]) >= 2
    assert results["wins"] + results["ties"] + results["losses"] == results["prompts"] * results["samples_per_prompt"]
    assert all(math.isfinite(row["kl"]) and math.isfinite(row["gold_reward"]) for row in results["checkpoints"])
    summary = json.loads((tmp_path / "stages" / "reward.json").read_text())["summary"]
    assert summary["train_pairs"] > 0 and 0.0 <= summary["val_accuracy"] <= 1.0
    assert "## Summary" in (tmp_path / "report.md").read_text()
