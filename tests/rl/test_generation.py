"""``PolicyGenerator`` (``lit_rlhf.rl.generation``): completions cut at their first stop, the backends behind
one ``Sampler`` interface giving the same rollouts, sampling without any algorithm."""

import pytest
import torch

from lit_rlhf.rl import GenerationOptions
from tests.rl.support import PROMPTS, prompt_batch, tiny_module


def test_stops_mask_everything_after_the_first_stop():
    module = tiny_module(generation=GenerationOptions(max_new_tokens=8, stop_strings=["."]))
    tok = module.tokenizer
    eos = tok.eos_token_id
    rows = [
        tok("ab", add_special_tokens=False)["input_ids"] + [eos] + tok("cd", add_special_tokens=False)["input_ids"],
        tok("x.yz", add_special_tokens=False)["input_ids"] + [eos],
        tok("hello", add_special_tokens=False)["input_ids"],
    ]
    mask, stopped, texts = module.generator.finish(torch.tensor(rows), module.generation)
    # EOS at index 2 is kept; "." completes at index 1; the last row never stops
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, True, False]
    assert texts == ["ab", "x", "hello"]


def test_rlhf_module_samples_natively_by_default_and_hf_on_request():
    batch = prompt_batch(PROMPTS)
    greedy = GenerationOptions(max_new_tokens=6, do_sample=False)
    native, hf = tiny_module(generation=greedy), tiny_module(generation=greedy, rollout_backend="hf")
    assert native.rollout_backend == "native"
    rollouts = [m.generator.rollout(batch) for m in (native, hf)]
    assert torch.equal(rollouts[0].samples.response_ids, rollouts[1].samples.response_ids)
    torch.testing.assert_close(rollouts[0].outputs.logprobs, rollouts[1].outputs.logprobs)


@pytest.mark.parametrize("suppress", [True, False])
def test_special_tokens_other_than_the_stops_are_never_sampled_by_default(suppress):
    # A reward sees completions with special tokens dropped: a policy that writes <unk> or <pad> looks empty to it.
    options = GenerationOptions(max_new_tokens=12, num_samples=8, suppress_special_tokens=suppress)
    module = tiny_module(generation=options)
    torch.manual_seed(0)
    rollout = module.generator.rollout(prompt_batch(PROMPTS))
    samples = rollout.samples
    banned = torch.isin(samples.response_ids, module.generator.suppressed) & samples.response_mask.bool()
    assert module.generator.suppressed.tolist() == [0, 1, 2]  # <pad>, <unk>, <|im_start|>; <|im_end|> stops
    if suppress:
        assert not banned.any()
        assert torch.isfinite(rollout.outputs.logprobs).all() and torch.isfinite(rollout.ref_logprobs).all()
    else:  # 64 rows × 12 steps of a random model over 104 tokens: the special ones do turn up
        assert banned.any()
