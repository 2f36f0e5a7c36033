"""Encoders and padding on hand-worked ids: prompt/response and SFT encoding, pad_left / pad_right and the three
collators."""

import pytest
import torch

from lit_rlhf.data.encoding import (
    IGNORE_INDEX,
    PreferenceCollator,
    PromptCollator,
    RankingCollator,
    SFTCollator,
    encode_prompt_completion,
    encode_prompt_response,
    encode_prompt_responses,
    encode_sft,
    pad_left,
    pad_right,
)
from lit_rlhf.data.rows import SFTExample, parse_sft_row
from lit_rlhf.models import MINILM, TINY_LLAMA, load_tokenizer
from tests.data.test_support import A, B, C, D, E, F, U, V, W, X, Y, Z


def test_encode_prompt_response_cuts_prompt_from_left(tok):
    # No specials in the char tokenizer: budget 6 keeps the whole response "xyz" and the last 3 prompt chars "def".
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=6) == [D, E, F, X, Y, Z]
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=8) == [B, C, D, E, F, X, Y, Z]
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=9) == [A, B, C, D, E, F, X, Y, Z]
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=50) == [A, B, C, D, E, F, X, Y, Z]
    # The response alone exceeds the budget: prompt dropped, response cut from the right to "uvwx".
    assert encode_prompt_response(tok, "ab", "uvwxyz", max_length=4) == [U, V, W, X]
    assert encode_prompt_response(tok, "ab", "c", max_length=10) == [A, B, C]


def test_encode_prompt_responses_cuts_each_response_budget_alone(tok):
    # Budget 5: "xyz" keeps the prompt's last 2 chars, "u" its last 4, "uvwxyz" none of it (cut to "uvwxy").
    encoded = encode_prompt_responses(tok, "abcdef", ["xyz", "u", "uvwxyz"], max_length=5)
    assert encoded == [[E, F, X, Y, Z], [C, D, E, F, U], [U, V, W, X, Y]]
    assert encoded == [encode_prompt_response(tok, "abcdef", r, 5) for r in ("xyz", "u", "uvwxyz")]


def test_encode_prompt_response_bert_pair_special_tokens():
    minilm = load_tokenizer(MINILM)
    cls, sep = minilm.cls_token_id, minilm.sep_token_id
    world, there, good, day = minilm.convert_tokens_to_ids(["world", "there", "good", "day"])
    # 7 = [CLS] + 2 prompt + [SEP] + 2 response + [SEP]: "hello" is cut from the left.
    ids = encode_prompt_response(minilm, "hello world there", "good day", max_length=7)
    assert ids == [cls, world, there, sep, good, day, sep]


def test_sft_rows_and_encoding(tok):
    plain = parse_sft_row({"prompt": "ab", "completion": "c"}, tok, chat_template=False)
    assert plain == SFTExample((("ab", False), ("c", True)))
    # EOS (3) appended after the completion; labels -100 on the prompt.
    assert encode_sft(tok, plain, 10) == ([A, B, C, 3], [IGNORE_INDEX, IGNORE_INDEX, C, 3])
    # Too long: the prompt goes first (from the left), then the completion from the right.
    assert encode_sft(tok, plain, 3) == ([B, C, 3], [IGNORE_INDEX, C, 3])
    assert encode_sft(tok, plain, 1) == ([C], [C])

    chat = parse_sft_row({"prompt": "ab", "completion": "c"}, tok)
    assert chat.segments == (
        ("<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n", False),
        ("c<|im_end|>\n", True),
    )
    ids, labels = encode_sft(tok, chat, 64)
    assert ids[-3:] == [C, 3, 100] and labels[-4:] == [IGNORE_INDEX, C, 3, 100]  # the template's EOS, none added
    assert labels.count(IGNORE_INDEX) == len(ids) - 3


# --- padding and collators -------------------------------------------------------------------------------------------


def test_pad_right_to_the_longest_or_a_given_length():
    ids, mask = pad_right([[A, B, C], [D], []], pad_id=0)
    assert ids.tolist() == [[A, B, C], [D, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_right([[A, B], [C]], pad_id=IGNORE_INDEX, length=4)
    assert ids.tolist() == [[A, B, -100, -100], [C, -100, -100, -100]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_pad_left_to_the_longest():
    ids, mask = pad_left([[A, B, C], [D], []], pad_id=0)
    assert ids.tolist() == [[A, B, C], [0, 0, D], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("name", [TINY_LLAMA, MINILM])
def test_pad_right_matches_the_tokenizers_own_right_padding(name):
    # RewardModel pads with pad_right where it used tokenizer.pad: the same ids and mask.
    tokenizer = load_tokenizer(name, padding_side="right")
    encoded = [encode_prompt_response(tokenizer, p, r, 32) for p, r in [("a question", " yes"), ("q", " a longer no")]]
    expected = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
    ids, mask = pad_right(encoded, tokenizer.pad_token_id)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_collators_batch_as_written_out_by_hand():
    # The tensors the collators gave before they moved here, written out: pad id 0, labels padded with -100.
    prompts = PromptCollator(pad_id=0)([("ab", [A, B]), ("c", [C])])
    assert prompts["prompt"] == ["ab", "c"]
    assert prompts["input_ids"].tolist() == [[A, B], [0, C]] and prompts["attention_mask"].tolist() == [[1, 1], [0, 1]]

    pairs = PreferenceCollator(pad_id=0)(
        [
            {"chosen_input_ids": [A], "rejected_input_ids": [B, C, D], "margin": 1.5},
            {"chosen_input_ids": [E, F], "rejected_input_ids": [U], "margin": 0.0},
        ]
    )
    # Both sides share the width of the longest of either side (3), so a model can stack them.
    assert pairs["chosen_input_ids"].tolist() == [[A, 0, 0], [E, F, 0]]
    assert pairs["chosen_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0]]
    assert pairs["rejected_input_ids"].tolist() == [[B, C, D], [U, 0, 0]]
    assert pairs["rejected_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pairs["margin"].dtype == torch.float32 and pairs["margin"].tolist() == [1.5, 0.0]

    items = [
        {"input_ids": [[A], [B, C], [D]], "scores": [0.5, 2.0, 0.5], "margin": 0.0},
        {"input_ids": [[E, F, U], [V]], "scores": [1.0, 0.0], "margin": 1.5},
    ]
    rankings = RankingCollator(pad_id=0)(items)
    assert PreferenceCollator(pad_id=0)(items).keys() == rankings.keys()  # it hands ranking items on
    # Five responses, one row each, padded to the longest (3); two rankings, K = 3 slots, the second's last empty.
    assert rankings["input_ids"].tolist() == [[A, 0, 0], [B, C, 0], [D, 0, 0], [E, F, U], [V, 0, 0]]
    assert rankings["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert rankings["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    # Scores become levels among the row's distinct scores: 0.5 -> 0, 2.0 -> 1; 1.0 -> 1, 0.0 -> 0.
    assert rankings["scores"].tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert rankings["margin"].tolist() == [0.0, 1.5]

    sft = SFTCollator(pad_id=0)([([A, B, C, 3], [IGNORE_INDEX, IGNORE_INDEX, C, 3]), ([X, 3], [X, 3])])
    assert sft["input_ids"].tolist() == [[A, B, C, 3], [X, 3, 0, 0]]
    assert sft["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert sft["labels"].tolist() == [[-100, -100, C, 3], [X, 3, -100, -100]]
    assert all(t.dtype == torch.long for t in sft.values())


def test_encode_prompt_completion_labels_the_completion_only(tok):
    # As encode_sft of (prompt, completion): EOS (3) appended, labels -100 on the prompt, the prompt cut first.
    assert encode_prompt_completion(tok, "ab", "c", 10) == ([A, B, C, 3], [IGNORE_INDEX, IGNORE_INDEX, C, 3])
    assert encode_prompt_completion(tok, "ab", "c", 3) == ([B, C, 3], [IGNORE_INDEX, C, 3])


def test_encode_prompt_completion_adds_leading_specials_once():
    minilm = load_tokenizer(MINILM)
    cls = minilm.cls_token_id
    hello, day = minilm.convert_tokens_to_ids(["hello", "day"])
    # MiniLM's leading special token is [CLS]: added before a plain prompt, not before one that already has it.
    plain = encode_prompt_completion(minilm, "hello", " day", 10)
    rendered = encode_prompt_completion(minilm, "[CLS] hello", " day", 10)
    assert plain == rendered
    assert plain[0][:3] == [cls, hello, day] and plain[1][:3] == [IGNORE_INDEX, IGNORE_INDEX, day]
