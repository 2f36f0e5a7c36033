"""Decoding (``lit_rlhf.rl.decoding``): options, stop masks and stop strings on hand-worked cases; the native
loop against transformers' ``generate`` (same greedy output, same distribution, same stops); the inverse-CDF draw."""

import pytest
import torch
from transformers import LogitsProcessor

from lit_rlhf.models import load_causal_lm, load_tokenizer
from lit_rlhf.rl import GenerationOptions
from lit_rlhf.rl.decoding import cut_at_stop_strings, draw, sample, stop_mask, stop_string_positions
from tests.rl.support import PROMPTS, prompt_batch


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_stop_mask_keeps_first_stop_and_masks_after():
    is_stop = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mask, stopped = stop_mask(is_stop)
    # row 0 stops at index 1 (kept), row 1 never stops (all kept), row 2 stops at once
    close(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert stopped.tolist() == [True, False, True]


def test_stop_string_positions_and_cut(tiny_llama_path):
    from lit_rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama_path)
    ids = torch.tensor([tokenizer("ab.cd", add_special_tokens=False)["input_ids"], tokenizer("abcde")["input_ids"]])
    # the character tokenizer maps one character to one token: "." is token 2 of row 0; row 1 has none
    assert stop_string_positions(tokenizer, ids, ["."]).tolist() == [2, -1]
    # row 0: "b." completes at index 2, before "cd" (index 4); row 1: "cd" completes at index 3
    assert stop_string_positions(tokenizer, ids, ["cd", "b."]).tolist() == [2, 3]
    assert cut_at_stop_strings("hello. bye. x", ["bye", "."]) == "hello"
    assert cut_at_stop_strings("no stop", ["."]) == "no stop"


def test_generation_options():
    config = GenerationOptions(max_new_tokens=5, temperature=0.7, stop_strings=["\n"]).to_hf([3], 0)
    assert (config.max_new_tokens, config.temperature, config.top_k, config.top_p) == (5, 0.7, 0, 1.0)
    assert config.stop_strings == ["\n"] and config.eos_token_id == [3] and config.pad_token_id == 0
    greedy = GenerationOptions(do_sample=False, temperature=0.5).to_hf([3], 0)
    assert not greedy.do_sample and greedy.temperature == 1.0
    for bad in ({"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_k": -1}, {"num_samples": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationOptions(**bad)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_causal_lm("tiny-llama").eval(), load_tokenizer("tiny-llama", padding_side="left")


class Force(LogitsProcessor):
    """Forces ``tokens[t]`` at response step t (then leaves the scores alone)."""

    def __init__(self, prompt_length: int, tokens: list[int]) -> None:
        self.prompt_length, self.tokens = prompt_length, tokens

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_length
        if t < len(self.tokens):
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.tokens[t]] = 0.0
        return scores


def generate(model, batch, options, stops, pad, processor=None, tokenizer=None):
    return model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        generation_config=options.to_hf(stops, pad),
        logits_processor=[processor] if processor is not None else None,
        tokenizer=tokenizer,
    )


def test_draw_follows_the_probabilities_and_never_draws_a_masked_token():
    # p = softmax(log [0.1, 0, 0.6, 0.3]) = [0.1, 0, 0.6, 0.3]; 20,000 draws: each share within 4 standard errors.
    scores = torch.tensor([0.1, 0.0, 0.6, 0.3]).log().expand(20_000, 4)
    torch.manual_seed(0)
    counts = torch.bincount(draw(scores), minlength=4).float() / 20_000
    assert counts[1] == 0
    for share, p in zip(counts.tolist(), [0.1, 0.0, 0.6, 0.3], strict=True):
        assert abs(share - p) <= 4 * (p * (1 - p) / 20_000) ** 0.5
    # One token with all the mass is always drawn, wherever it sits (first, last).
    for hot in (0, 3):
        only = torch.full((100, 4), float("-inf"))
        only[:, hot] = 1.0
        assert draw(only).eq(hot).all()


def test_greedy_decoding_returns_exactly_what_generate_returns(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(PROMPTS)  # left-padded, lengths 1 to 5
    options = GenerationOptions(max_new_tokens=12, do_sample=False)
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    ours = sample(model, batch["input_ids"], batch["attention_mask"], options, stops, pad)
    assert torch.equal(ours, generate(model, batch, options, stops, pad))


def test_stops_pad_and_end_early_like_generate(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(PROMPTS[:3])
    length, stops, pad = batch["input_ids"].shape[1], [7], tokenizer.pad_token_id
    options = GenerationOptions(max_new_tokens=10, do_sample=False)
    # Steps 0-2 forced to 5, 7 (a stop), 9: every row stops at step 1, so both stop after two tokens.
    force = Force(length, [5, 7, 9])
    ours = sample(model, batch["input_ids"], batch["attention_mask"], options, stops, pad, force)
    assert ours[:, length:].tolist() == [[5, 7]] * 3
    assert torch.equal(ours, generate(model, batch, options, stops, pad, force))


def test_stop_strings_end_a_row_like_generate(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(["hello", "abc"])
    length, pad = batch["input_ids"].shape[1], tokenizer.pad_token_id
    stop_ids = tokenizer("END", add_special_tokens=False)["input_ids"]
    options = GenerationOptions(max_new_tokens=8, do_sample=False, stop_strings=["END"])
    force = Force(length, [5, *stop_ids])
    ours = sample(model, batch["input_ids"], batch["attention_mask"], options, [], pad, force, tokenizer)
    assert ours.shape[1] == length + 1 + len(stop_ids)  # ended at the token that completed "END"
    assert torch.equal(ours, generate(model, batch, options, [], pad, force, tokenizer))
    with pytest.raises(ValueError, match="need the tokenizer"):
        sample(model, batch["input_ids"], batch["attention_mask"], options, [], pad)


def test_sampling_distribution_matches_the_warped_softmax(tiny):
    # The first response token of one prompt, 6,000 times: its empirical distribution must match
    # softmax(top-5(logits / 0.7)), the distribution generate samples from with these options.
    model, tokenizer = tiny
    batch = prompt_batch(["tell me a story"] * 6000)
    options = GenerationOptions(max_new_tokens=1, temperature=0.7, top_k=5)
    torch.manual_seed(0)
    first = sample(model, batch["input_ids"], batch["attention_mask"], options, [], tokenizer.pad_token_id)[:, -1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:1]).logits[0, -1] / 0.7
    top = logits.topk(5)
    expected = torch.zeros_like(logits).index_put_((top.indices,), top.values.softmax(-1))
    observed = torch.bincount(first, minlength=logits.shape[0]).float() / first.numel()
    assert set(first.unique().tolist()) <= set(top.indices.tolist())
    assert (observed - expected).abs().max() < 4 * (0.25 / 6000) ** 0.5  # 4 standard errors at the worst p = 0.5
