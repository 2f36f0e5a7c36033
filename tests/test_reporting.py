"""Report writing: tables, plots, the assembled report.md."""

import json

import pytest

from lit_rlhf.reporting import (
    Section,
    escape_cell,
    markdown_table,
    plot_curves,
    plot_gold_vs_proxy,
    read_jsonl,
    sample_rows,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_markdown_table_formats_and_escapes():
    rows = [{"policy": "initial", "gold": 0.12345, "n": 3}, {"policy": "a|b\nc", "gold": -1.0}]
    table = markdown_table(rows, {"policy": "Policy", "gold": "Gold reward", "n": "N"})
    assert table.splitlines() == [
        "| Policy | Gold reward | N |",
        "| --- | ---: | ---: |",
        "| initial | 0.123 | 3 |",
        "| a\\|b<br>c | -1.000 |  |",  # '|' escaped, newline kept as <br>, missing field empty
    ]
    assert escape_cell("<|im_end|>") == "&lt;\\|im_end\\|&gt;"
    assert escape_cell("abcdefghij", max_chars=5) == "abcd…"
    with pytest.raises(ValueError, match="no columns"):
        markdown_table([])


def test_plot_curves_from_records_and_columns(tmp_path):
    records = [{"step": s, "objective/reward": 0.1 * s, "objective/kl": 0.01 * s} for s in range(5)]
    records.append({"step": 5, "stage": "val", "val/reward": 1.0})  # lacks the plotted keys: skipped
    path = plot_curves(records, ["objective/reward", "objective/kl"], tmp_path / "plots" / "curves.png")
    assert_png(path)
    assert_png(plot_curves({"reward": [1.0, 2.0, 1.5]}, ["reward", "missing"], tmp_path / "cols.png"))


def test_plot_gold_vs_proxy(tmp_path):
    rows = [
        {"checkpoint": "initial", "kl": 0.0, "gold_reward": 0.1, "proxy_reward": -0.5},
        {"checkpoint": "final", "kl": 8.0, "gold_reward": 0.3, "proxy_reward": 2.5},
        {"checkpoint": "step-10", "kl": 2.0, "gold_reward": 0.4, "proxy_reward": 1.0},
    ]
    assert_png(plot_gold_vs_proxy(rows, tmp_path / "gold_vs_proxy.png", sqrt_x=True))
    with pytest.raises(ValueError, match="row 0 \\(initial\\) lacks numeric field\\(s\\) \\['kl'\\]"):
        plot_gold_vs_proxy([{"checkpoint": "initial", "gold_reward": 0.1, "proxy_reward": 0.0}], tmp_path / "x.png")
    baselines = [{"checkpoint": "best-of-4", "kl": 0.64, "gold_reward": 0.35, "proxy_reward": 1.2}]
    with_baselines = plot_gold_vs_proxy(rows, tmp_path / "with_baselines.png", baselines=baselines)
    assert_png(with_baselines)
    assert with_baselines.read_bytes() != plot_gold_vs_proxy(rows, tmp_path / "without.png").read_bytes()
    with pytest.raises(ValueError, match="row 3 \\(best-of-2\\) lacks"):
        plot_gold_vs_proxy(rows, tmp_path / "x.png", baselines=[{"checkpoint": "best-of-2", "kl": 0.19}])


def test_write_report_assembles_sections(tmp_path):
    image = plot_curves({"reward": [0.0, 1.0]}, ["reward"], tmp_path / "plots" / "reward.png")
    samples = sample_rows(["Say hi"], ["meh | ok\nbye"], ["Hello, lovely day!"], [0.0], [0.8])
    path = write_report(
        tmp_path,
        [
            Section("Evaluation", text="Held-out prompts.", rows=[{"policy": "final", "gold": 0.5}], images=[image]),
            Section("Samples", rows=samples, columns=["prompt", "before", "after", "after_score"]),
            "Raw *markdown* tail.",
        ],
        title="Demo",
    )
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert text.startswith("# Demo\n")
    assert "## Evaluation\n" in text and "Held-out prompts." in text
    assert "| final | 0.500 |" in text
    assert "![reward](plots/reward.png)" in text
    assert "| Say hi | meh \\| ok<br>bye | Hello, lovely day! | 0.800 |" in text
    assert text.rstrip().endswith("Raw *markdown* tail.")


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0}) + "\n\n{broken\n")
    with pytest.raises(ValueError, match="metrics.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"step": 0}) + "\n")
    assert read_jsonl(path) == [{"step": 0}]
