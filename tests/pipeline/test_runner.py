"""``lit-rlhf pipeline`` (``lit_rlhf.pipeline.runner``): recipes parse, the tiny recipe runs end to end, stages skip
when up to date and redo when forced or changed, stage selection and fingerprints."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.judges import BradleyTerryAnnotator, VaderJudge
from lit_rlhf.pipeline import PipelineConfig, main
from lit_rlhf.pipeline.common import annotator_for, gold_judge_for
from lit_rlhf.pipeline.runner import STAGES, fingerprint, lock_output, select_stages
from tests.pipeline.support import PNG_MAGIC, RECIPES, TINY, parse, pipeline_in_subprocess, run, stamps


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
    # The best-of-2 baseline (evaluate.best_of_n in the recipe): a row measured like the checkpoints, at the analytic
    # KL log 2 - 1/2, with as many samples (matched by prompt and sample index, so it has a win rate and an Elo).
    [best_of_2] = results["best_of_n"]
    assert (best_of_2["checkpoint"], best_of_2["n"]) == ("best-of-2", 2)
    assert best_of_2["kl"] == pytest.approx(math.log(2) - 0.5)
    assert all(math.isfinite(best_of_2[k]) for k in ("gold_reward", "proxy_reward", "win_rate_vs_initial", "elo"))
    samples = [json.loads(line) for line in (tiny_run / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert [s["sample"] for s in samples if s["checkpoint"] == "best-of-2"] == [0, 1] * 4
    assert re.search(r"^\| best-of-2 \|", report, re.MULTILINE)

    history = [json.loads(line) for line in (tiny_run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in history] == [0, 1]
    assert (tiny_run / "rl" / "hf" / "final" / "config.json").exists()
    assert (tiny_run / "rl" / "hf" / "final" / "critic" / "config.json").exists()  # rl.value_model: shared
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


def test_a_second_run_into_a_held_output_folder_fails_at_once_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    hold = (
        "import sys, time; from pathlib import Path; from lit_rlhf.pipeline.runner import lock_output\n"
        "with lock_output(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"is in use by another pipeline run \(pid {holder.pid} on "):
            run("--output_dir", str(tmp_path))
        assert not (tmp_path / "stages").exists() and not (tmp_path / "config.yaml").exists()  # nothing touched
    finally:
        holder.kill()  # like kill -9: the lock file stays behind, unlocked
        holder.wait()
    assert (tmp_path / ".lock").exists()
    with lock_output(tmp_path):  # taken over
        assert str(os.getpid()) in (tmp_path / ".lock").read_text()


def test_a_stage_that_fails_keeps_the_previous_outputs(tiny_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    before = {p.relative_to(root): p.stat().st_mtime_ns for p in (root / "rl").rglob("*")}
    marker = (root / "stages" / "rl.json").read_text()
    with pytest.raises(RuntimeError, match="the reward service is down"):
        run("rl", "--output_dir", str(root), "--rl.reward", "tests.pipeline.support.Explode")
    assert {p.relative_to(root): p.stat().st_mtime_ns for p in (root / "rl").rglob("*")} == before
    assert (root / "stages" / "rl.json").read_text() == marker and (root / "report.md").exists()


@pytest.mark.parametrize("torn", ['{"stage": "evaluate", "run_id"', "[]"], ids=["truncated", "not-a-marker"])
def test_an_unreadable_marker_counts_as_not_done(torn, tiny_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    (root / "stages" / "evaluate.json").write_text(torn)
    before = stamps(root)
    run("--output_dir", str(root))
    after = stamps(root)
    assert [s for s in STAGES if after[s] != before[s]] == ["evaluate", "report"]
    printed = capsys.readouterr().out
    assert "stages/evaluate.json" in printed and "the stage counts as not done" in printed
    (root / "stages" / "evaluate.json").write_text(torn)
    run("evaluate", "--output_dir", str(root), "--force")  # --force too reads the markers it depends on
    assert json.loads((root / "stages" / "evaluate.json").read_text())["stage"] == "evaluate"


def test_a_pipeline_killed_in_the_rl_stage_continues_from_its_last_snapshot(tmp_path):
    def reward(marker: Path) -> str:
        config = {"class_path": "tests.pipeline.support.DieOnCall", "init_args": {"call": 4, "marker": str(marker)}}
        return json.dumps(config)

    settings = ["--rl.iterations", "5", "--rl.checkpoint_every", "2"]
    (tmp_path / "never").touch()  # the marker already exists: this run never dies
    whole = pipeline_in_subprocess(
        "--output_dir", str(tmp_path / "whole"), *settings, "--rl.reward", reward(tmp_path / "never")
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    args = ["--output_dir", str(tmp_path / "killed"), *settings, "--rl.reward", reward(tmp_path / "once")]
    killed = pipeline_in_subprocess(*args)  # dies in the 4th RL iteration; the last snapshot is iteration 2's
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "stages" / "rl.json").exists()
    assert (tmp_path / "killed" / ".partial" / "rl" / "rl" / "resume.ckpt").exists()
    resumed = pipeline_in_subprocess(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[rl] continuing the interrupted run" in resumed.stdout
    assert "[collect] up to date" in resumed.stdout and "[reward] up to date" in resumed.stdout
    assert not (tmp_path / "killed" / ".partial").exists() or not any((tmp_path / "killed" / ".partial").iterdir())

    def rows(root: Path) -> list[dict]:
        lines = (root / "rl" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]

    assert rows(tmp_path / "killed") == rows(tmp_path / "whole")
    final = "rl/checkpoints/iter-0005/adapter_model.safetensors"
    assert (tmp_path / "killed" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()
    results = [json.loads((tmp_path / run / "evaluate" / "results.json").read_text()) for run in ("whole", "killed")]
    assert results[0]["checkpoints"] == results[1]["checkpoints"]
