"""Write a run's ``report.md``: markdown tables, sample tables and PNG plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Section",
    "escape_cell",
    "markdown_table",
    "plot_curves",
    "plot_gold_vs_proxy",
    "read_jsonl",
    "sample_rows",
    "write_report",
]

History = Mapping[str, Sequence[float]] | Sequence[Mapping[str, Any]]
Columns = Sequence[str] | Mapping[str, str]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on servers and CI; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file (e.g. ``metrics.jsonl``); blank lines are skipped, bad lines name file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def _series(history: History, key: str, x_key: str) -> tuple[list[float], list[float]]:
    """(x, y) for ``key``: records lacking the key (or holding a non-number) are skipped."""
    if isinstance(history, Mapping):
        ys = list(history.get(key, []))
        xs = list(history[x_key]) if x_key in history else list(range(len(ys)))
        pairs = list(zip(xs, ys, strict=False))
    else:
        pairs = [(row.get(x_key, i), row.get(key)) for i, row in enumerate(history)]
    return [float(x) for x, y in pairs if _is_number(y)], [float(y) for _, y in pairs if _is_number(y)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(
    history: History,
    keys: Sequence[str],
    path: str | Path,
    x_key: str = "step",
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Plot metrics per iteration, one panel per key (reward and KL have different scales), and save a PNG.

    Args:
        history: Either columns ``{key: [values...]}`` or per-iteration records ``[{"step": 0, key: value}, ...]``
            (the rows of ``metrics.jsonl``); records without a key are skipped for that key.
        keys: Metric names to plot, e.g. ``["objective/reward", "objective/kl"]``.
        path: Output PNG path; parent folders are created.
        x_key: Field holding the x value; the position in the history when absent.
        title: Figure title.
        labels: Display names for keys (defaults to the key).

    Returns:
        The PNG path.
    """
    if not keys:
        raise ValueError("plot_curves: give at least one metric key.")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    labels = labels or {}
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 2.4 * len(keys) + 0.6), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        xs, ys = _series(history, key, x_key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, f"no values for {key!r}", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(labels.get(key, key))
        ax.grid(alpha=0.3)
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel(x_key)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_gold_vs_proxy(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    x: str = "kl",
    gold: str = "gold_reward",
    proxy: str = "proxy_reward",
    label: str | None = "checkpoint",
    x_label: str | None = None,
    sqrt_x: bool = False,
    title: str | None = "Gold vs proxy reward",
    baselines: Sequence[Mapping[str, Any]] = (),
    baseline_label: str = "baseline",
) -> Path:
    """Gold and proxy reward per checkpoint on twin y axes, the over-optimisation picture of Gao et al. (2022).

    The proxy (learned reward model) keeps rising as the policy moves away from the reference while the gold score
    flattens or falls; the two are in different units, hence two y axes (gold left, proxy right). ``baselines`` (e.g.
    best-of-n at its analytic KL) are drawn as their own dotted series on the same axes.

    Args:
        rows: One mapping per checkpoint with the ``x``, ``gold`` and ``proxy`` fields (and ``label``).
        path: Output PNG path.
        x: Field on the x axis: KL to the reference (``kl``) or the iteration.
        gold: Field with the gold (annotator's judge) reward.
        proxy: Field with the proxy (reward model) reward.
        label: Field whose value annotates each point; None for no annotations.
        x_label: Axis label; defaults to ``KL(π ‖ π_ref)`` for ``kl`` and to the field name otherwise.
        sqrt_x: Plot √x: Gao et al. use d = √KL as the distance from the initial policy.
        title: Figure title.
        baselines: Rows with the same fields for points that are not checkpoints of the run (best-of-n).
        baseline_label: What the legend calls the ``baselines`` series.

    Returns:
        The PNG path.
    """
    if not rows:
        raise ValueError("plot_gold_vs_proxy: no checkpoint rows.")
    for i, row in enumerate([*rows, *baselines]):
        missing = [k for k in (x, gold, proxy) if not _is_number(row.get(k))]
        if missing:
            raise ValueError(f"plot_gold_vs_proxy: row {i} ({row.get(label, '?')}) lacks numeric field(s) {missing}.")
    plt = _pyplot()
    fig, ax_gold = plt.subplots(figsize=(6.4, 4.2))
    ax_proxy = ax_gold.twinx()
    gold_color, proxy_color = "tab:green", "tab:purple"
    series = [(rows, "", "-", "--", "o", "s")]
    if baselines:
        series.append((baselines, f", {baseline_label}", ":", ":", "^", "v"))
    for group, suffix, gold_style, proxy_style, gold_marker, proxy_marker in series:
        group = sorted(group, key=lambda r: r[x])
        xs = [math.sqrt(max(r[x], 0.0)) if sqrt_x else r[x] for r in group]
        ax_gold.plot(
            xs,
            [r[gold] for r in group],
            color=gold_color,
            marker=gold_marker,
            linestyle=gold_style,
            label=f"gold (judge){suffix}",
        )
        ax_proxy.plot(
            xs,
            [r[proxy] for r in group],
            color=proxy_color,
            marker=proxy_marker,
            linestyle=proxy_style,
            label=f"proxy (RM){suffix}",
        )
        if label:
            for xv, r in zip(xs, group, strict=True):
                if label in r:
                    ax_gold.annotate(
                        str(r[label]), (xv, r[gold]), textcoords="offset points", xytext=(4, 6), fontsize=8
                    )
    ax_gold.set_ylabel("gold reward (judge)", color=gold_color)
    ax_proxy.set_ylabel("proxy reward (reward model)", color=proxy_color)
    ax_gold.tick_params(axis="y", colors=gold_color)
    ax_proxy.tick_params(axis="y", colors=proxy_color)
    default = "KL(π ‖ π_ref) (nats)" if x == "kl" else x
    ax_gold.set_xlabel(x_label or (f"√{default}" if sqrt_x else default))
    handles = ax_gold.get_legend_handles_labels()[0] + ax_proxy.get_legend_handles_labels()[0]
    # below the axes: inside, it would cover points of one of the two series
    ax_gold.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax_gold.grid(alpha=0.3)
    if title:
        ax_gold.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    _pyplot().close(fig)
    return path


def escape_cell(value: Any, floatfmt: str = ".3f", max_chars: int | None = None) -> str:
    """Render one table cell: floats formatted, text HTML-escaped, ``|`` escaped and newlines turned into ``<br>``.

    HTML-escaping keeps chat markup such as ``<|im_end|>`` visible instead of being swallowed as a tag.
    """
    if value is None:
        return ""
    if isinstance(value, float):
        text = format(value, floatfmt) if math.isfinite(value) else str(value)
    elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors and numpy scalars
        return escape_cell(value.item(), floatfmt, max_chars)
    else:
        text = str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    text = html.escape(text, quote=False).replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Columns | None = None,
    floatfmt: str = ".3f",
    max_chars: int | None = None,
) -> str:
    """A GitHub-flavoured markdown table.

    Args:
        rows: One mapping per row; a missing field gives an empty cell.
        columns: Field names in order, or ``{field: header}``; default: the fields of the first row.
        floatfmt: Format spec for floats.
        max_chars: Cut longer cells with an ellipsis.

    Returns:
        The table, ending with a newline.
    """
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    if not headers:
        raise ValueError("markdown_table: no columns (give columns= or at least one row).")
    keys = list(headers)
    lines = [
        "| " + " | ".join(escape_cell(headers[k]) for k in keys) + " |",
        "|" + "|".join(" ---: " if _numeric_column(rows, k) else " --- " for k in keys) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(escape_cell(row.get(k), floatfmt, max_chars) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _numeric_column(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    values = [row.get(key) for row in rows if row.get(key) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sample_rows(
    prompts: Sequence[str],
    before: Sequence[str],
    after: Sequence[str],
    before_scores: Sequence[float] | None = None,
    after_scores: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Rows for a before/after sample table: ``prompt``, ``before``, ``after`` (and their scores when given)."""
    if not len(prompts) == len(before) == len(after):
        raise ValueError(f"sample_rows: {len(prompts)} prompts, {len(before)} before and {len(after)} after samples.")
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt, "before": before[i], "after": after[i]}
        if before_scores is not None:
            row["before_score"] = float(before_scores[i])
        if after_scores is not None:
            row["after_score"] = float(after_scores[i])
        rows.append(row)
    return rows


@dataclass
class Section:
    """One ``##`` section of the report: text, then an optional table, then images."""

    title: str
    """Section heading."""
    text: str = ""
    """Markdown paragraph(s) under the heading."""
    rows: Sequence[Mapping[str, Any]] | None = None
    """Table rows (see ``markdown_table``)."""
    columns: Columns | None = None
    """Table columns or ``{field: header}``."""
    images: Sequence[str | Path] = field(default_factory=list)
    """PNG files to embed; linked relative to the report folder."""
    max_chars: int | None = None
    """Cut longer table cells (useful for sample tables)."""
    floatfmt: str = ".3f"
    """Float format in the table."""


def write_report(
    output_dir: str | Path,
    sections: Sequence[Section | str],
    title: str = "lit_rlhf report",
    intro: str = "",
    filename: str = "report.md",
) -> Path:
    """Assemble and write ``output_dir/filename``.

    Args:
        output_dir: Report folder; created if needed. Image links are made relative to it.
        sections: ``Section`` objects, or raw markdown strings inserted as they are.
        title: Top-level heading.
        intro: Paragraph under the title.
        filename: Report file name.

    Returns:
        The report path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    if intro:
        parts.append(intro.strip() + "\n")
    for section in sections:
        if isinstance(section, str):
            parts.append(section.strip() + "\n")
            continue
        parts.append(f"## {section.title}\n")
        if section.text:
            parts.append(section.text.strip() + "\n")
        if section.rows is not None:
            parts.append(markdown_table(section.rows, section.columns, section.floatfmt, section.max_chars))
        for image in section.images:
            rel = Path(os.path.relpath(Path(image).resolve(), output_dir.resolve())).as_posix()
            parts.append(f"![{Path(image).stem}]({rel})\n")
    path = output_dir / filename
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
