"""Where one RL iteration of ours spends its time, and what candidate speed-ups buy (prototyped here by patching
the module, not by editing it): ``python bench/profile_rl.py [--tiny] [--variants baseline,shared,...]``.

A variant is ``baseline`` or options joined by ``+``: ``unfused`` (log-probs and entropy from two log-softmaxes, as
before the fused ``logprobs_and_entropy``), ``shared`` (critic head on the policy trunk: one forward gives log-probs
and values, instead of a separate critic), ``bf16`` (the Trainer's ``precision="bf16-mixed"``: bfloat16 autocast,
LM head in float32), ``loopadam`` (torch's default AdamW, a loop over tensors, as before ``finetuning.adamw`` fused it),
``generate`` (``rollout_backend: hf``, transformers' ``generate``, as before the native decoding loop),
``recompute`` (the update recomputes the policy forward instead of reusing the rollout's). ``baseline`` is PPO with
a separate critic in float32, fused log-softmax, fused AdamW, native sampling, the rollout's forward reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import BENCH_DIR, peak_rss_mb, set_threads  # noqa: E402

SECTIONS: dict[str, float] = defaultdict(float)


@contextmanager
def section(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        SECTIONS[name] += time.perf_counter() - start


def timed(obj: Any, attr: str, name: str) -> None:
    """Wrap ``obj.attr`` so its wall time adds to ``SECTIONS[name]``."""
    original = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        with section(name):
            return original(*args, **kwargs)

    setattr(obj, attr, wrapper)


def build(options: set[str], tiny: bool):
    from lit_rlhf.judges import VaderJudge
    from lit_rlhf.models import resolve
    from lit_rlhf.rl import GenerationOptions, RLHFModule
    from lit_rlhf.rl.optimizers import PPO

    torch.manual_seed(0)
    module = RLHFModule(
        resolve("tiny-llama" if tiny else "smollm2-135m-instruct"),
        reward=VaderJudge(),
        algorithm=PPO(epochs=1),  # as in the RL benchmark
        generation=GenerationOptions(max_new_tokens=8 if tiny else 32),
        value_model="shared" if "shared" in options else "separate",
        learning_rate=1e-5,
        rollout_seed=0,
        rollout_backend="hf" if "generate" in options else "native",
        optimizer=partial(torch.optim.AdamW, weight_decay=0.0) if "loopadam" in options else None,
    )
    module.reuse_rollout_forward = "recompute" not in options
    if "unfused" in options:
        import lit_rlhf.rl.policy as policy_file
        from lit_rlhf.rl.policy import entropy_from_logits, logprobs_from_logits

        policy_file.logprobs_and_entropy = lambda logits, tokens: (
            logprobs_from_logits(logits, tokens),
            entropy_from_logits(logits),
        )
    return module


def profile(variant: str, tiny: bool, iterations: int) -> dict[str, Any]:
    import lit_rlhf.rl.policy as policy_file

    SECTIONS.clear()
    options = set() if variant == "baseline" else set(variant.split("+"))
    unknown = options - {"unfused", "shared", "bf16", "loopadam", "generate", "recompute"}
    if unknown:
        raise SystemExit(f"unknown variant option(s) {sorted(unknown)} in {variant!r}")
    fused = policy_file.logprobs_and_entropy
    try:
        return _profile(build(options, tiny), variant, options, tiny, iterations)
    finally:
        policy_file.logprobs_and_entropy = fused  # undo ``unfused`` for the next variant


def _profile(module: Any, variant: str, options: set[str], tiny: bool, iterations: int) -> dict[str, Any]:
    import lightning as L

    import lit_rlhf.rl.generation as generation_file
    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.models import resolve

    timed(module.generator, "finish", "decode")
    timed(generation_file, "score", "reward (VADER)")
    timed(module.models, "reference_logprobs", "reference forward")
    # The phase is where a forward is called from, not whether autograd is on: a rollout may keep its forward's
    # graph for the update (``RLHFModule.reuse_rollout_forward``).
    phase = ["rollout"]
    update = module._update

    def timed_update(*args, **kwargs):
        phase[0] = "update"
        try:
            with section("update (fwd + bwd + step)"):
                return update(*args, **kwargs)
        finally:
            phase[0] = "rollout"

    module._update = timed_update
    if module.models.value_model is not None:
        critic_forward = module.models.value_model.forward

        def critic(*args, **kwargs):
            with section(f"critic forward ({phase[0]})"):
                return critic_forward(*args, **kwargs)

        module.models.value_model.forward = critic
    original_outputs = module.models.outputs

    def policy_outputs(*args, **kwargs):
        with section(f"policy forward ({phase[0]})"):
            return original_outputs(*args, **kwargs)

    module.models.outputs = policy_outputs
    data = PromptDataModule(resolve("tiny-llama" if tiny else "smollm2-135m-instruct"), batch_size=8, shuffle=False)
    durations: list[float] = []
    metrics: list[dict[str, float]] = []

    class Clock(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            timed(pl_module.generator.sampler, "sample", "generate")  # the sampler the module chose in setup

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            durations.append(time.perf_counter() - self.start)
            metrics.append(outputs["metrics"])

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=iterations,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
        precision="bf16-mixed" if "bf16" in options else "32-true",
    )
    trainer.fit(module, data)
    # The first iteration warms up allocators and kernels; report the rest.
    warm = sum(durations[1:]) / max(1, len(durations) - 1)
    total = sum(durations)
    # Sections nest (the critic runs inside policy_outputs, which runs inside _update): make them exclusive.
    times = dict(SECTIONS)
    for phase in ("rollout", "update"):
        times[f"policy forward ({phase})"] = times.get(f"policy forward ({phase})", 0.0) - times.get(
            f"critic forward ({phase})", 0.0
        )
    times["backward + optimizer step"] = times.pop("update (fwd + bwd + step)") - sum(
        times.get(f"{what} forward (update)", 0.0) for what in ("policy", "critic")
    )
    times["other (Lightning, KL, advantages, logging)"] = total - sum(times.values())
    shares = {name: seconds / total for name, seconds in sorted(times.items(), key=lambda kv: -kv[1])}
    # Sanity of the numerics: KL to the reference, and how far the update moved the policy from the rollout's.
    checks = (
        "objective/kl",
        "objective/score",
        "policy/approx_kl",
        "policy/clip_frac",
        "objective/entropy",
        "response/length",
    )
    return {
        "variant": variant,
        "seconds_per_iteration": warm,
        "iteration_seconds": durations,
        "share_of_time": shares,
        "peak_rss_mb": peak_rss_mb(),
        "metrics_per_iteration": [{key: m[key] for key in checks if key in m} for m in metrics],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--variants", default="baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON file for the results (default: bench/results/profile[-tiny].json)")
    args = parser.parse_args()
    set_threads(args.threads)
    results = []
    for variant in args.variants.split(","):
        result = profile(variant, args.tiny, args.iterations)
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    out = Path(args.out) if args.out else BENCH_DIR / "results" / ("profile-tiny.json" if args.tiny else "profile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
