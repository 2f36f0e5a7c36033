"""RLHFModule on tiny-llama: each algorithm trains what it should and nothing else; rollouts, NLPO masking, export."""

import math

import pytest
import torch

from lit_rlhf.models import LoraOptions
from lit_rlhf.rewards import LengthReward
from lit_rlhf.rl import A2C, NLPO, PPO, AdaptiveKL, GenerationOptions
from lit_rlhf.rl.optimizers.nlpo import MASK_ADAPTER, top_p_mask
from lit_rlhf.rl.rollout import causal_lm_forward, full_precision_head
from tests.test_rl_support import (
    PROMPTS,
    Outputs,
    prompt_batch,
    prompt_loader,
    tiny_module,
    trainer,
)

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
    policy_before, value_before = snapshot(module.policy), snapshot(module.value_model)
    reference_before = snapshot(module.reference) if module.reference is not None else None
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())

    assert len(outputs.outputs) == 2 and module.iteration == 2
    for out in outputs.outputs:
        for key in ("policy/loss", "value/loss", "policy/approx_kl", "objective/kl", "objective/score"):
            assert math.isfinite(out["metrics"][key]), (key, out["metrics"])
        assert len(out["completions"]) == len(PROMPTS) and out["scores"].shape == (len(PROMPTS),)
    assert module.kl.coef != 0.1  # the adaptive controller moved

    policy_changed = changed(policy_before, module.policy)
    assert changed(value_before, module.value_model), "the critic did not train"
    if lora:
        assert module.reference is None  # the reference is the adapter-disabled policy, not a copy
        assert policy_changed and all("lora_" in n and ".default." in n for n in policy_changed), policy_changed
        assert any("lora_B.default" in n for n in policy_changed)
        assert not any(MASK_ADAPTER in n for n in policy_changed)  # NLPO's snapshot only moves at a sync
    else:
        assert policy_changed and not changed(reference_before, module.reference)
        assert all(not p.requires_grad for p in module.reference.parameters())
    if name == "nlpo" and not lora:
        masked = module.algorithm._masked  # still the initial policy: no sync since iteration 0
        assert all(torch.equal(p, reference_before[n]) for n, p in masked.named_parameters())


def test_logprobs_match_the_sampling_distribution():
    # The training forward (left padding, position ids, temperature) must reproduce generate's sampling log-probs.
    module = tiny_module(generation=GenerationOptions(max_new_tokens=6, temperature=0.7))
    module.eval()
    batch = prompt_batch(PROMPTS)
    config = module.generation.to_hf(module.stop_token_ids, module.tokenizer.pad_token_id)
    torch.manual_seed(1)
    out = module.policy.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        generation_config=config,
        output_scores=True,
        return_dict_in_generate=True,
    )
    length = batch["input_ids"].shape[1]
    response = out.sequences[:, length:]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    mask, _, _ = module._finish(response, module.generation)
    attention = torch.cat([batch["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        ours = module.policy_outputs(out.sequences, attention, length).logprobs
    torch.testing.assert_close(ours * mask, sampled * mask, atol=1e-4, rtol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_nlpo_samples_only_from_the_masked_top_p_set(lora):
    nlpo = NLPO(top_mask=0.3, min_tokens_to_keep=2)
    module = tiny_module(algorithm=nlpo, lora=LoraOptions(r=4) if lora else None)
    module.eval()
    with torch.no_grad():  # make π_mask differ from the policy so that its mask, not the policy's, is tested
        target = module.policy if lora else nlpo._masked
        for n, p in target.named_parameters():
            if not lora or (MASK_ADAPTER in n and "lora_B" in n):
                p.add_(0.05 * torch.randn_like(p))
    rollout = module.rollout(prompt_batch(PROMPTS))
    exp = rollout.experience
    length = exp.prompt_ids.shape[1]
    with torch.no_grad(), nlpo.masked_policy(module.policy) as masked:
        logits, _ = causal_lm_forward(masked, exp.sequences, exp.attention_mask, length)
    allowed = top_p_mask(logits, 0.3, 2).gather(-1, exp.response_ids.unsqueeze(-1)).squeeze(-1)
    assert allowed[exp.response_mask.bool()].all()
    assert torch.isfinite(exp.logprobs).all()
    # top 30% of π_mask's mass: a small share of the 104-token vocabulary, and never fewer than 2 tokens
    assert 2 <= nlpo._allowed_tokens < 50
    if lora:
        assert nlpo._masked is None and module.policy.active_adapter == "default"
        trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n for n in trainable)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_nlpo_resyncs_the_masked_copy_on_schedule(lora):
    nlpo = NLPO(mask_update_interval=3)
    module = tiny_module(algorithm=nlpo, lora=LoraOptions(r=4) if lora else None)

    def masked_weights():
        if not lora:
            return {n: p.clone() for n, p in nlpo._masked.named_parameters()}
        return {
            n.replace(MASK_ADAPTER, "default"): p.clone()
            for n, p in module.policy.named_parameters()
            if MASK_ADAPTER in n
        }

    def policy_weights(keys):
        return {n: p.detach().clone() for n, p in module.policy.named_parameters() if n in keys}

    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = masked_weights()
    nlpo.on_iteration_start(module, 1)  # not a multiple of 3: no sync
    assert all(torch.equal(before[n], p) for n, p in masked_weights().items())
    assert any(not torch.equal(before[n], p) for n, p in policy_weights(before).items())
    nlpo.on_iteration_start(module, 3)
    after, policy = masked_weights(), policy_weights(before)
    assert all(torch.equal(after[n], policy[n]) for n in after)


def test_stops_mask_everything_after_the_first_stop():
    module = tiny_module(generation=GenerationOptions(max_new_tokens=8, stop_strings=["."]))
    tok = module.tokenizer
    eos = tok.eos_token_id
    rows = [
        tok("ab", add_special_tokens=False)["input_ids"] + [eos] + tok("cd", add_special_tokens=False)["input_ids"],
        tok("x.yz", add_special_tokens=False)["input_ids"] + [eos],
        tok("hello", add_special_tokens=False)["input_ids"],
    ]
    mask, stopped, texts = module._finish(torch.tensor(rows), module.generation)
    # EOS at index 2 is kept; "." completes at index 1; the last row never stops
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, True, False]
    assert texts == ["ab", "x", "hello"]


def test_score_shaping_and_reward_checks():
    module = tiny_module(missing_eos_penalty=1.0, normalize_reward=True, reward_clip=1.0)
    raw, stopped = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, True, True])
    # penalty -> [1, 1, 3, 4]; mean 2.25, population std sqrt(1.6875) = 1.29904
    # -> [-0.9623, -0.9623, 0.5774, 1.3472]; clipped at 1
    torch.testing.assert_close(
        module._shape_scores(raw, stopped), torch.tensor([-0.9623, -0.9623, 0.5774, 1.0]), atol=1e-4, rtol=0
    )
    module.reward = lambda prompts, completions: [0.0]
    with pytest.raises(ValueError, match="one score per completion"):
        module.score(["a", "b"], ["c", "d"])
    module.reward = lambda prompts, completions: [float("nan")] * len(completions)
    with pytest.raises(ValueError, match="non-finite"):
        module.score(["a"], ["b"])
    module.reward = None
    with pytest.raises(RuntimeError, match="model.reward"):
        module.score(["a"], ["b"])


def test_value_model_choices():
    shared = tiny_module(value_model="shared")
    assert shared.value_model is None and shared.value_head is not None
    # Both kinds of critic start at 0 for every token (the mean of normalised returns), not at random values.
    batch = prompt_batch(PROMPTS)
    with torch.no_grad():
        values = shared.policy_outputs(batch["input_ids"], batch["attention_mask"], 2).values
        separate = tiny_module(value_model="separate")
        assert torch.equal(
            separate.value_model(batch["input_ids"], batch["attention_mask"]), torch.zeros(batch["input_ids"].shape)
        )
    assert torch.equal(values, torch.zeros_like(values))
    # A reward that is never 0 for these short responses, so the first iteration's returns cannot all be 0.
    shared = tiny_module(value_model="shared", reward=LengthReward(target=8, unit="chars"))
    head_before, policy_before = snapshot(shared.value_head), snapshot(shared.policy)
    trainer(1).fit(shared, prompt_loader())
    assert changed(head_before, shared.value_head) and changed(policy_before, shared.policy)
    with pytest.raises(ValueError, match="needs a critic"):
        tiny_module(value_model="none")
    with pytest.raises(ValueError, match="value_model_path"):
        tiny_module(value_model="shared", value_model_path="tiny-llama")


def test_generate_and_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    module = tiny_module(lora=LoraOptions(r=4), algorithm=NLPO())
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.1)
    completions = module.generate(["hi", "tell me"], GenerationOptions(max_new_tokens=4, num_samples=2))
    assert len(completions) == 4 and all(isinstance(c, str) for c in completions)
    path = module.export(tmp_path / "policy")
    exported = AutoModelForCausalLM.from_pretrained(path)
    batch = prompt_batch(["hello there"])
    with torch.no_grad():
        ours = module.policy(input_ids=batch["input_ids"]).logits
        theirs = exported(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_full_precision_head_keeps_logits_float32_under_autocast():
    module = tiny_module()
    batch = prompt_batch(PROMPTS)
    with torch.no_grad():
        exact = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert full_precision_head(module.policy) and not full_precision_head(module.policy)  # once only
            mixed = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rounded.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    # The trunk still runs in bfloat16, so the logits are not exact, but closer than bfloat16 logits.
    assert (mixed - exact).abs().max() < (rounded.float() - exact).abs().max()


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
    """A list that grows by one at each call of ``module.policy_outputs``."""
    calls: list[int] = []
    forward = module.policy_outputs
    module.policy_outputs = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
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
