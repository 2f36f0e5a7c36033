"""``RLHFModule`` on tiny-llama: each algorithm trains what it should and nothing else, mixed precision, the
learning-rate schedule, the optimizer, the reused rollout forward, export."""

import math

import pytest
import torch

from lit_rlhf.models import LoraOptions
from lit_rlhf.rewards import LengthReward
from lit_rlhf.rl import A2C, NLPO, PPO, AdaptiveKL, GenerationOptions
from lit_rlhf.rl.optimizers.nlpo import MASK_ADAPTER
from tests.rl.support import PROMPTS, Outputs, prompt_batch, prompt_loader, tiny_module, trainer

ALGORITHMS = {
    "ppo": lambda: PPO(epochs=2, num_minibatches=2),
    "a2c": lambda: A2C(),
    "nlpo": lambda: NLPO(epochs=2, num_minibatches=2, top_mask=0.5, mask_update_interval=10),
}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_trains_only_intended_parameters(name, lora):
    module = tiny_module(algorithm=ALGORITHMS[name](), lora=LoraOptions(r=4) if lora else None, kl=AdaptiveKL(0.1, 1.0))
    policy_before, value_before = snapshot(module.policy), snapshot(module.models.value_model)
    reference = module.models.reference
    reference_before = snapshot(reference) if reference is not None else None
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())

    assert len(outputs.outputs) == 2 and module.iteration == 2
    for out in outputs.outputs:
        for key in ("policy/loss", "value/loss", "policy/approx_kl", "objective/kl", "objective/score"):
            assert math.isfinite(out["metrics"][key]), (key, out["metrics"])
        assert len(out["completions"]) == len(PROMPTS) and out["scores"].shape == (len(PROMPTS),)
    assert module.kl.coef != 0.1  # the adaptive controller moved

    policy_changed = changed(policy_before, module.policy)
    assert changed(value_before, module.models.value_model), "the critic did not train"
    if lora:
        assert reference is None  # the reference is the adapter-disabled policy, not a copy
        assert policy_changed and all("lora_" in n and ".default." in n for n in policy_changed), policy_changed
        assert any("lora_B.default" in n for n in policy_changed)
        assert not any(MASK_ADAPTER in n for n in policy_changed)  # NLPO's snapshot only moves at a sync
    else:
        assert policy_changed and not changed(reference_before, reference)
        assert all(not p.requires_grad for p in reference.parameters())
    if name == "nlpo" and not lora:
        masked = module.algorithm.masked  # still the initial policy: no sync since iteration 0
        assert all(torch.equal(p, reference_before[n]) for n, p in masked.named_parameters())


def test_generate_and_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    module = tiny_module(lora=LoraOptions(r=4), algorithm=NLPO())
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.1)
    completions = module.generator.generate(["hi", "tell me"], GenerationOptions(max_new_tokens=4, num_samples=2))
    assert len(completions) == 4 and all(isinstance(c, str) for c in completions)
    path = module.export(tmp_path / "policy")
    exported = AutoModelForCausalLM.from_pretrained(path)
    batch = prompt_batch(["hello there"])
    with torch.no_grad():
        ours = module.policy(input_ids=batch["input_ids"]).logits
        theirs = exported(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_mixed_precision_trains_with_float32_logits(lora):
    module = tiny_module(
        algorithm=PPO(epochs=2),
        lora=LoraOptions(r=4) if lora else None,
        reward=LengthReward(target=8, unit="chars"),  # never 0 here: the returns vary, every metric is a number
    )
    before = snapshot(module.policy)
    outputs = Outputs()
    trainer(2, callbacks=[outputs], precision="bf16-mixed").fit(module, prompt_loader())
    assert getattr(module.policy.get_output_embeddings(), "_lit_rlhf_full_precision", False)
    assert changed(before, module.policy)
    assert all(p.dtype == torch.float32 for p in module.policy.parameters())  # weights stay float32 (mixed)
    first = outputs.outputs[0]["metrics"]
    # Rollout and update run the same autocast computation: at the first iteration the policy is the reference
    # and the first epoch's ratio is exactly 1, so the KL is 0 to rounding.
    assert abs(first["objective/kl"]) < 1e-5
    for out in outputs.outputs:
        assert all(math.isfinite(v) for v in out["metrics"].values()), out["metrics"]


def test_linear_schedule_decays_the_learning_rate_once_per_iteration():
    module = tiny_module(learning_rate=1e-3, scheduler="linear", schedule_iterations=4)
    outputs = Outputs()
    trainer(3, callbacks=[outputs]).fit(module, prompt_loader())
    rates = [out["metrics"]["policy/lr"] for out in outputs.outputs]
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4])  # iteration i trains at lr · (1 − i / 4)
    with pytest.raises(ValueError, match="schedule_iterations"):
        tiny_module(scheduler="linear", schedule_iterations=0)


def test_default_optimizer_is_fused_adamw_over_policy_and_critic():
    module = tiny_module(learning_rate=1e-3, value_learning_rate=1e-2)
    trainer(1).fit(module, prompt_loader())
    opt = module.optimizers().optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]


def count_policy_forwards(module) -> list[int]:
    """A list that grows by one at each forward of the policy (``module.models.outputs``)."""
    calls: list[int] = []
    forward = module.models.outputs
    module.models.outputs = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["ppo_one_minibatch", "a2c", "nlpo_one_minibatch"])
def test_update_reuses_the_rollout_forward_with_the_same_result(name, lora):
    make = {
        "ppo_one_minibatch": lambda: PPO(epochs=2, num_minibatches=1),
        "a2c": lambda: A2C(),
        "nlpo_one_minibatch": lambda: NLPO(epochs=2, num_minibatches=1, top_mask=0.5, mask_update_interval=10),
    }[name]
    runs = {}
    for reuse in (True, False):
        module = tiny_module(
            algorithm=make(), lora=LoraOptions(r=4) if lora else None, reward=LengthReward(target=8, unit="chars")
        )
        module.reuse_rollout_forward = reuse
        calls = count_policy_forwards(module)
        outputs = Outputs()
        trainer(1, callbacks=[outputs]).fit(module, prompt_loader())
        metrics = {k: v for k, v in outputs.outputs[0]["metrics"].items() if not k.startswith("time/")}
        runs[reuse] = (snapshot(module.policy), metrics, len(calls))
    (reused, reused_metrics, reused_calls), (fresh, fresh_metrics, fresh_calls) = runs[True], runs[False]
    assert fresh_calls - reused_calls == 1  # one policy forward fewer
    # Same computation on the same rows; the update's rows come shuffled, which reorders float sums (~1e-7 in the
    # gradients). Adam divides each gradient by its own scale, so a near-zero one can move its weight's step by a
    # little more: allow 1 % of one step (lr 1e-3).
    for key, value in fresh.items():
        torch.testing.assert_close(reused[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert reused_metrics == pytest.approx(fresh_metrics, rel=1e-4, abs=1e-6)


def test_update_recomputes_the_forward_when_minibatches_differ_from_the_rollout():
    module = tiny_module(algorithm=PPO(epochs=1, num_minibatches=2))
    assert not module.update_reuses_rollout_forward()
    calls = count_policy_forwards(module)
    trainer(1).fit(module, prompt_loader())
    assert len(calls) == 3  # the rollout's, then one per minibatch


@pytest.mark.parametrize(
    "algorithm, caught_by",
    [
        (A2C, "RLHFModule after iteration 0's update: trained weights are no longer finite"),  # its one step
        (PPO, "PPO at iteration 0: the loss is nan"),  # the second of its steps sees the broken weights
    ],
)
def test_an_absurd_learning_rate_stops_rl_before_a_checkpoint_holds_bad_weights(algorithm, caught_by, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module(algorithm=algorithm(), learning_rate=1e39, reward=LengthReward(target=8, unit="chars"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(FloatingPointError, match=f"{caught_by}.*lower the learning rate"):
        trainer(2, callbacks=[checkpoints], enable_checkpointing=True).fit(module, prompt_loader())
    assert not list(tmp_path.glob("*.ckpt"))
