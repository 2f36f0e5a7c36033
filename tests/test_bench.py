"""The benchmark scripts run: our side of every bench in ``--tiny`` mode (tiny-llama, a few steps; nothing is timed).
The TRL side runs only where its venv exists (bench/README.md says how to make it); CI has none and skips it."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import run  # noqa: E402
from common import rl_iteration_flops  # noqa: E402


def test_rl_flop_count_by_hand():
    # trunk 10, head 2, 1 row, prompt 3, response 2, 1 epoch, separate critic:
    # trunk pass 2·10·1·5 = 100; head pass 2·2·1·3 = 12; lm pass 112
    # generation 100 + 2·2·1·2 = 108; rollout 2·112 (policy, reference) + 100 (critic) = 324
    # update 1 epoch × 3 × (112 + 100) = 636; total 1068
    assert rl_iteration_flops(10, 2, 1, 3, 2, 1, "separate") == 1068
    # without the critic's trunk: 108 + 224 + 3·112 = 668
    assert rl_iteration_flops(10, 2, 1, 3, 2, 1, "shared") == 668
    # the first pass reusing the rollout's forward: one forward of policy and critic fewer, 1068 - 212 = 856
    assert rl_iteration_flops(10, 2, 1, 3, 2, 1, "separate", reused_forward=True) == 856


@pytest.mark.parametrize("task", ["rl", "rl-group", "reward", "sft", "dpo", "generation"])
def test_our_side_runs_tiny(task, tmp_path, tiny_llama_path):
    assert run.main(["--task", task, "--tiny", "--sides", "ours", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{task}-tiny.json").read_text())
    for row in result["rows"]:
        assert "error" not in row["ours"], row["ours"]
        assert row["ours"]["peak_rss_mb"] > 0
    table = (tmp_path / f"{task}-tiny.md").read_text()
    assert all(f"| {row['row']} |" in table for row in result["rows"]) and f"--task {task}" in table


@pytest.mark.skipif(not run.TRL_PYTHON.exists(), reason="bench/.venv-trl not built (peer side of the benchmarks)")
def test_trl_side_runs_tiny(tmp_path, tiny_llama_path):
    assert run.main(["--task", "sft", "--tiny", "--sides", "peer", "--threads", "1", "--out", str(tmp_path)]) == 0
