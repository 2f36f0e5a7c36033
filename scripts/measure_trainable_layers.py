"""How many layers RL needs to train: the demo's RL and evaluate stages re-run with ``rl.trainable_layers`` = 2, 8
and all (None), on one set of collected pairs and one reward model, recording the gold win rate against the initial
policy, the KL to it, seconds per RL iteration and the RL stage's peak resident memory (docs/scaling.md).

    python scripts/measure_trainable_layers.py                          # the demo: about 50 min on 2 CPU cores
    python scripts/measure_trainable_layers.py --source outputs/demo    # reuse a demo run's collect and reward
    python scripts/measure_trainable_layers.py --config recipes/pipeline/tiny.yaml --layers 1,all \\
        --output_dir /tmp/layers-tiny                                   # the plumbing, in a minute

Arguments after ``--`` go to every ``lit-rlhf pipeline`` call (e.g. ``-- --precision 32-true --rl.iterations 2``).
Collect and reward run once, into ``OUTPUT_DIR/shared`` (skipped when up to date) unless ``--source`` names a run that
has them; each setting then gets ``OUTPUT_DIR/layers-N`` with copies of those outputs, and its RL and evaluate stages
run (forced) in a fresh process, so each peak RSS is that setting's own. Results: ``OUTPUT_DIR/trainable_layers.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(run_dir: str, layers: str, pipeline_args: list[str]) -> None:
    """Run the RL stage (forced) with ``rl.trainable_layers`` = ``layers`` in this process and record its peak RSS,
    then the evaluate stage; print one JSON line."""
    from lit_rlhf.pipeline import main

    # After the recipe (--config), which would otherwise override them.
    common = [*pipeline_args, "--output_dir", run_dir, "--rl.trainable_layers", "null" if layers == "all" else layers]
    baseline = peak_rss_mb()
    start = time.perf_counter()
    main(["--stages", "rl", "--force", *common])
    rl = {"rl_wall_s": time.perf_counter() - start, "rl_peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}
    main(["--stages", "evaluate", "--force", *common])
    print(json.dumps(rl))


def copy_inputs(source: Path, target: Path) -> None:
    """Give ``target`` the collect and reward outputs (and their markers) of ``source``, so only RL onward runs."""
    for stage in ("collect", "reward"):
        marker = source / "stages" / f"{stage}.json"
        if not marker.exists():
            raise SystemExit(f"{source} has no finished {stage} stage ({marker} is missing); run it first.")
        shutil.rmtree(target / stage, ignore_errors=True)
        shutil.copytree(source / stage, target / stage)
        (target / "stages").mkdir(parents=True, exist_ok=True)
        shutil.copy2(marker, target / "stages" / marker.name)


def summarise(run_dir: Path, measured: dict[str, float]) -> dict[str, Any]:
    """One row: the evaluate stage's final-vs-initial numbers, the RL stage's timings and the measured memory."""
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    rl = json.loads((run_dir / "stages" / "rl.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines() if line]
    loops = [r["time/rollout"] + r["time/update"] for r in rows if "time/rollout" in r and "time/update" in r]
    iterations = rl["summary"]["iterations"]
    final = results["checkpoints"][-1]
    return {
        "win_rate": results["win_rate"],
        "wins_ties_losses": [results["wins"], results["ties"], results["losses"]],
        "kl": final["kl"],
        "gold_reward": final["gold_reward"],
        "initial_gold_reward": results["checkpoints"][0]["gold_reward"],
        "iterations": iterations,
        "s_per_iteration": statistics.fmean(loops) if loops else None,
        "rl_stage_s_per_iteration": rl["seconds"] / max(iterations, 1),
        **measured,
    }


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """The results as a markdown table, one row per ``trainable_layers`` setting."""
    lines = [
        "| trainable_layers | win rate vs initial (W/T/L) | KL (nats) | s / iteration | RL stage s / iteration | "
        "peak RSS (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for layers, r in rows.items():
        loop = "n/a" if r["s_per_iteration"] is None else f"{r['s_per_iteration']:.2f}"
        wins, ties, losses = r["wins_ties_losses"]
        lines.append(
            f"| {layers} | {r['win_rate']:.3f} ({wins}/{ties}/{losses}) | {r['kl']:.2f} | {loop} | "
            f"{r['rl_stage_s_per_iteration']:.2f} | {r['rl_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def pipeline(args: list[str]) -> None:
    subprocess.run([sys.executable, "-c", "from lit_rlhf.pipeline import main; main()", *args], check=True, cwd=ROOT)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/pipeline/demo.yaml", help="The pipeline recipe.")
    parser.add_argument("--output_dir", default="outputs/trainable_layers", help="Where the runs and results go.")
    parser.add_argument("--source", default=None, help="A run folder whose collect and reward stages are reused.")
    parser.add_argument("--layers", default="2,8,all", help="Comma-separated rl.trainable_layers settings.")
    parser.add_argument("--child", nargs=2, metavar=("RUN_DIR", "LAYERS"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    config = ["--config", str(Path(options.config).resolve()), "--progress_bar", "false", *extra]
    if options.child:
        child(*options.child, config)
        return
    out = Path(options.output_dir).resolve()
    source = Path(options.source).resolve() if options.source else out / "shared"
    if options.source is None:
        pipeline([*config, "--stages", "collect,reward", "--output_dir", str(source)])
    rows: dict[str, dict[str, Any]] = {}
    for layers in options.layers.split(","):
        run_dir = out / f"layers-{layers}"
        copy_inputs(source, run_dir)
        command = [sys.executable, __file__, "--child", str(run_dir), layers, "--config", options.config, "--", *extra]
        done = subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        measured = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        rows[layers] = summarise(run_dir, measured)
        print(f"trainable_layers {layers}: {json.dumps(rows[layers])}", flush=True)
    settings = {"config": options.config, "pipeline_args": extra, "source": str(source)}
    (out / "trainable_layers.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    (out / "trainable_layers.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
