"""The policy's forwards (``lit_rlhf.rl.policy``): log-probs and entropy on hand-worked numbers, positions
under left padding, the float32 LM head under autocast, the critic choices and their export, and log-probs that match
sampling."""

import math

import pytest
import torch

from lit_rlhf.freezing import layer_stack
from lit_rlhf.models import LoraOptions, load_causal_lm
from lit_rlhf.rewards import LengthReward
from lit_rlhf.rl import PPO, RLOO, GenerationOptions
from lit_rlhf.rl.decoding import Suppress
from lit_rlhf.rl.policy import (
    entropy_from_logits,
    full_precision_head,
    logprobs_and_entropy,
    logprobs_from_logits,
    position_ids,
)
from tests.rl.support import PROMPTS, Outputs, prompt_batch, prompt_loader, tiny_module, trainer

LN2 = math.log(2)


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_logprobs_from_logits():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]; tokens 2 then 0 -> [ln 1/2, ln 1/4]
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    close(logprobs_from_logits(logits, torch.tensor([[2, 0]])), [[-LN2, -2 * LN2]])


def test_entropy_uniform_and_masked():
    # uniform over 4 -> ln 4; two of four at -inf -> uniform over 2 -> ln 2, and the gradient stays finite
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    close(entropy, [[2 * LN2, LN2]])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_position_ids_skip_left_padding():
    close(position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_fused_logprobs_and_entropy_match_the_separate_functions():
    logits = torch.randn(2, 3, 5)
    logits[0, 0, 1] = float("-inf")  # a masked token (NLPO) must not turn either output into nan
    tokens = torch.tensor([[0, 2, 4], [1, 1, 3]])
    logprobs, entropy = logprobs_and_entropy(logits, tokens)
    torch.testing.assert_close(logprobs, logprobs_from_logits(logits, tokens))
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    assert torch.isfinite(entropy).all()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("suppress", [True, False], ids=["special-tokens-suppressed", "full-vocabulary"])
def test_logprobs_match_the_sampling_distribution(suppress):
    # The training forward (left padding, position ids, temperature, suppressed special tokens) must reproduce the
    # log-probs of generate's sampling distribution.
    options = GenerationOptions(max_new_tokens=6, temperature=0.7, suppress_special_tokens=suppress)
    module = tiny_module(generation=options)
    module.eval()
    batch = prompt_batch(PROMPTS)
    config = module.generation.to_hf(module.generator.stop_token_ids, module.tokenizer.pad_token_id)
    torch.manual_seed(1)
    out = module.policy.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        generation_config=config,
        logits_processor=[Suppress(module.generator.suppressed)] if suppress else None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    length = batch["input_ids"].shape[1]
    response = out.sequences[:, length:]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    mask, _, _ = module.generator.finish(response, module.generation)
    attention = torch.cat([batch["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        ours = module.policy_outputs(out.sequences, attention, length).logprobs
    torch.testing.assert_close(ours * mask, sampled * mask, atol=1e-4, rtol=0)


def test_value_model_choices():
    shared = tiny_module(value_model="shared")
    assert shared.models.value_model is None and shared.models.value_head is not None
    # Both kinds of critic start at 0 for every token (the mean of normalised returns), not at random values.
    batch = prompt_batch(PROMPTS)
    with torch.no_grad():
        values = shared.policy_outputs(batch["input_ids"], batch["attention_mask"], 2).values
        separate = tiny_module(value_model="separate")
        assert torch.equal(
            separate.models.value_model(batch["input_ids"], batch["attention_mask"]),
            torch.zeros(batch["input_ids"].shape),
        )
    assert torch.equal(values, torch.zeros_like(values))
    # A reward that is never 0 for these short responses, so the first iteration's returns cannot all be 0.
    shared = tiny_module(value_model="shared", reward=LengthReward(target=8, unit="chars"))
    head_before, policy_before = snapshot(shared.models.value_head), snapshot(shared.policy)
    trainer(1).fit(shared, prompt_loader())
    assert changed(head_before, shared.models.value_head) and changed(policy_before, shared.policy)
    with pytest.raises(ValueError, match="needs a critic"):
        tiny_module(value_model="none")
    with pytest.raises(ValueError, match="value_model_path"):
        tiny_module(value_model="shared", value_model_path="tiny-llama")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_the_critic_exports_as_a_token_classifier_with_the_critics_values(critic, lora, tmp_path):
    from transformers import AutoModelForTokenClassification

    module = tiny_module(value_model=critic, algorithm=PPO(epochs=1), lora=LoraOptions(r=4) if lora else None)
    # Two iterations: a separate trunk's adapter gets no gradient in the first, through the zero-initialised head.
    trainer(2).fit(module, prompt_loader())
    exported = AutoModelForTokenClassification.from_pretrained(module.export(tmp_path / "policy") / "critic").eval()
    assert exported.config.num_labels == 1
    module.eval()
    with torch.no_grad():
        batch = prompt_batch(PROMPTS)  # left-padded prompts
        samples = module.generator.samples(batch["prompt"], batch["input_ids"], batch["attention_mask"])
        length, sequences, mask = samples.prompt_ids.shape[1], samples.sequences, samples.attention_mask
        ours = module.models.outputs(sequences, mask, length).values
        # Position i holds the value of the state after token i: response token t's is at length - 1 + t.
        logits = exported(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
    theirs, kept = logits[:, length - 1 : -1, 0], samples.response_mask.bool()
    close(theirs[kept], ours[kept], tol=1e-6)
    assert ours[kept].std() > 1e-3  # a trained critic (the initial one is 0 everywhere)
    if lora:  # the adapter merged into the exported trunk
        base = load_causal_lm("tiny-llama").model.state_dict()
        trunk = exported.base_model.state_dict()
        assert not torch.equal(trunk["layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"])


def test_a_module_without_a_critic_exports_the_policy_alone(tmp_path):
    module = tiny_module(algorithm=RLOO(), generation=GenerationOptions(max_new_tokens=8, num_samples=2))
    assert module.models.critic is None and module.export_critic() is None
    path = module.export(tmp_path / "policy")
    assert (path / "config.json").exists() and not (path / "critic").exists()


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


def test_entropy_gradient_matches_plain_autograd_with_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    logits[0, 1, [2, 5]] = float("-inf")  # banned tokens: p = 0, they must add 0 to the value and the gradient
    weights = torch.randn(2, 3)

    def plain(logits):  # the textbook formula, written with autograd
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)

    ours_in, plain_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, reference = entropy_from_logits(ours_in), plain(plain_in)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours_in.grad, plain_in.grad)
    assert torch.isfinite(ours_in.grad).all() and (ours_in.grad[0, 1, [2, 5]] == 0).all()
    # uniform over 7 tokens: log 7; over the 5 allowed ones: log 5
    uniform = torch.zeros(1, 2, 7)
    uniform[0, 1, :2] = float("-inf")
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[math.log(7), math.log(5)]]))


def test_a_bfloat16_reference_keeps_its_head_and_starts_at_the_policys_log_probs():
    module = tiny_module(reference_dtype="bfloat16")
    reference = module.models.reference
    assert {p.dtype for p in layer_stack(reference)[1].parameters()} == {torch.bfloat16}
    assert reference.get_output_embeddings().weight.dtype == torch.float32  # log-probs keep float32 logits
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    outputs = Outputs()
    trainer(1, callbacks=[outputs], precision="bf16-mixed").fit(module, prompt_loader())
    # autocast multiplies in bfloat16 either way: only the norms' weights are rounded, so the first rollout's KL to
    # the reference (before any update) is next to nothing
    first_kl = outputs.outputs[0]["metrics"]["objective/kl"]
    assert abs(first_kl) < 0.02, first_kl
    with pytest.raises(ValueError, match="reference_dtype: bfloat16 needs trainer.precision bf16-mixed"):
        trainer(1).fit(tiny_module(reference_dtype="bfloat16"), prompt_loader())
