"""``lit-rlhf pipeline`` (``lit_rlhf.pipeline.runner``): recipes parse, the tiny recipe runs end to end, stages skip
when up to date and redo when forced or changed, stage selection and fingerprints."""

import json
import math
import re

import pytest

from lit_rlhf.judges import BradleyTerryAnnotator, VaderJudge
from lit_rlhf.pipeline import PipelineConfig, main
from lit_rlhf.pipeline.common import annotator_for, gold_judge_for
from lit_rlhf.pipeline.runner import STAGES, fingerprint, select_stages
from tests.pipeline.support import PNG_MAGIC, RECIPES, TINY, parse, run, stamps


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
    config = parse("--config", str(recipe))
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


def test_unknown_stage_is_an_error_that_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(TINY), "--stages", "collect,train"])
    assert "collect, reward, rl, evaluate, report" in capsys.readouterr().err


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
