"""``PolicyGenerator`` (``lit_rlhf.rl.generation``): completions cut at their first stop, the backends behind
one ``Sampler`` interface giving the same rollouts, sampling without any algorithm."""

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
