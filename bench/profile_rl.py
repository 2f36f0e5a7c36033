"""Where one RL iteration of ours spends its time, and what candidate speed-ups buy (prototyped here by patching
the module, not by editing it): ``python bench/profile_rl.py [--tiny] [--variants baseline,shared,...]``.

Variants: ``baseline`` (PPO, separate critic), ``shared`` (critic head on the policy trunk: one forward gives
log-probs and values), ``fused`` (one log-softmax for log-probs and entropy), ``bf16`` (bfloat16 autocast on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
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


def fused_outputs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` and entropy from ONE log-softmax. Shape: (B, T, V), (B, T) -> (B, T), (B, T)."""
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def build(variant: str, tiny: bool):
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
        value_model="shared" if variant == "shared" else "separate",
        learning_rate=1e-5,
        rollout_seed=0,
    )
    if variant == "fused":
        import lit_rlhf.rl.module as module_file

        # policy_outputs computes log_softmax twice (log-probs, then entropy); share it.
        cache: dict[int, Any] = {}

        def logprobs(logits, tokens):
            value, entropy = fused_outputs(logits, tokens)
            cache[id(logits)] = entropy
            return value

        def entropy(logits):
            return cache.pop(id(logits))

        module_file.logprobs_from_logits, module_file.entropy_from_logits = logprobs, entropy
    return module


def profile(variant: str, tiny: bool, iterations: int) -> dict[str, Any]:
    import lightning as L

    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.models import resolve

    SECTIONS.clear()
    module = build(variant, tiny)
    timed(module, "_sample", "generate")
    timed(module, "score", "reward (decode + VADER)")
    timed(module, "reference_logprobs", "reference forward")
    timed(module, "_update", "update (fwd + bwd + step)")
    if module.value_model is not None:
        critic_forward = module.value_model.forward

        def critic(*args, **kwargs):
            with section("critic forward (update)" if torch.is_grad_enabled() else "critic forward (rollout)"):
                return critic_forward(*args, **kwargs)

        module.value_model.forward = critic
    original_outputs = module.policy_outputs

    def policy_outputs(*args, **kwargs):
        name = "policy forward (update)" if torch.is_grad_enabled() else "policy forward (rollout)"
        with section(name):
            return original_outputs(*args, **kwargs)

    module.policy_outputs = policy_outputs
    context = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else nullcontext()
    data = PromptDataModule(resolve("tiny-llama" if tiny else "smollm2-135m-instruct"), batch_size=8, shuffle=False)
    durations: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            durations.append(time.perf_counter() - self.start)

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
    )
    with context:
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
    return {"variant": variant, "seconds_per_iteration": warm, "share_of_time": shares, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--variants", default="baseline")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    results = []
    for variant in args.variants.split(","):
        result = profile(variant, args.tiny, args.iterations)
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    out = BENCH_DIR / "results" / ("profile-tiny.json" if args.tiny else "profile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
