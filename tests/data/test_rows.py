"""Row formats on small hand-written rows: hh-rlhf transcripts, plain and conversational preference rows, SFT rows,
and errors that name the file, line and field; plus the real hh-rlhf harmless-base test file."""

import re
from collections import Counter

import pytest

from lit_rlhf.data.encoding import IGNORE_INDEX, encode_sft
from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.preferences import read_preferences
from lit_rlhf.data.rows import PreferenceExample, SFTExample, parse_preference_row, parse_sft_row, split_transcript_pair
from tests.data.test_support import HH_DEV, B, D


def test_hh_multi_turn_splits_at_last_assistant_turn():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"
    row = {"chosen": history + " Apple.", "rejected": history + " Rock."}
    counts = Counter()
    example = parse_preference_row(row, counts=counts)
    assert example == PreferenceExample(history, " Apple.", " Rock.")
    assert counts["realigned"] == 0


def test_hh_chosen_with_extra_turn_uses_shared_prefix():
    # The chosen reply itself contains a second "Assistant:" turn, so its last marker is not in the rejected text.
    chosen = "\n\nHuman: Q\n\nAssistant: A1\n\nAssistant: A2"
    rejected = "\n\nHuman: Q\n\nAssistant: B"
    assert split_transcript_pair(chosen, rejected) == ("\n\nHuman: Q\n\nAssistant:", " A1\n\nAssistant: A2", " B", True)


def test_hh_different_prompts_is_an_error():
    row = {"chosen": "\n\nHuman: Q1\n\nAssistant: A", "rejected": "\n\nHuman: Q2\n\nAssistant: B"}
    with pytest.raises(DataFormatError, match=r"^f.jsonl:7: field 'rejected': chosen and rejected transcripts have"):
        parse_preference_row(row, file="f.jsonl", line=7)


@pytest.mark.skipif(not HH_DEV.exists(), reason=f"{HH_DEV} not present")
def test_real_hh_rlhf_harmless_dev_parses():
    stats = {}
    examples = read_preferences(HH_DEV, stats=stats)
    print(f"hh-rlhf harmless dev: {stats}")
    assert stats["rows"] == stats["kept"] == len(examples) == 1156
    assert stats["invalid"] == stats["identical"] == 0
    assert stats["realigned"] == 4  # rows whose chosen reply contains a further turn
    assert all(e.prompt.endswith("\n\nAssistant:") for e in examples)


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "prompt is text, so chosen must be text"),
        ({"prompt": 5, "chosen": "c", "rejected": "r"}, "prompt", "expected text or messages"),
        ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "prompt[0].content", "missing or not text"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin", "expected a number"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": float("nan")}, "margin", "must be finite"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": True}, "margin", "expected a number"),
    ],
)
def test_bad_fields_are_named(row, field, reason):
    with pytest.raises(DataFormatError, match=rf"^d.jsonl:4: field '{re.escape(field)}': {reason}"):
        parse_preference_row(row, file="d.jsonl", line=4)


def test_margin_column():
    assert parse_preference_row({"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1.5}).margin == 1.5
    assert parse_preference_row({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "2"}).margin == 2.0  # CSV
    assert parse_preference_row({"prompt": "p", "chosen": "c", "rejected": "r", "margin": ""}).margin == 0.0
    assert parse_preference_row({"prompt": "p", "chosen": "c", "rejected": "r"}).margin == 0.0


def test_conversational_with_chat_template(tok):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": "go",  # plain text is taken as the assistant reply
    }
    example = parse_preference_row(row, tok)
    assert example.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (example.chosen, example.rejected) == ("hello<|im_end|>\n", "go<|im_end|>\n")


def test_conversational_full_conversations_without_prompt(tok):
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    row = {
        "chosen": [*history, {"role": "assistant", "content": "yes"}],
        "rejected": [*history, {"role": "assistant", "content": "no"}],
        "margin": 0.5,
    }
    example = parse_preference_row(row, tok)
    turns = "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
    assert example == PreferenceExample(turns + "<|im_start|>assistant\n", "yes<|im_end|>\n", "no<|im_end|>\n", 0.5)


def test_sft_messages_train_every_assistant_turn(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    example = parse_sft_row({"messages": messages}, tok)
    assert [text for text, target in example.segments if target] == ["b<|im_end|>\n", "d<|im_end|>\n"]
    assert "".join(text for text, _ in example.segments) == tok.apply_chat_template(messages, tokenize=False)
    _, labels = encode_sft(tok, example, 128)
    assert [t for t in labels if t != IGNORE_INDEX] == [B, 3, 100, D, 3, 100]


def test_sft_hh_transcript_and_errors(tok):
    example = parse_sft_row({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}, tok)
    assert (example.prompt, example.completion) == ("\n\nHuman: hi\n\nAssistant:", " hello")
    with pytest.raises(DataFormatError, match=r"^s:2: field 'messages': the conversation must end with an assistant"):
        parse_sft_row({"messages": [{"role": "user", "content": "a"}]}, tok, "s", 2)
    with pytest.raises(DataFormatError, match=r"^s:3: field '<row>': unknown SFT format"):
        parse_sft_row({"text": "a"}, tok, "s", 3)
    from_pair = parse_sft_row({"prompt": "q", "chosen": "good", "rejected": "bad"}, tok, chat_template=False)
    assert from_pair == SFTExample((("q", False), ("good", True)))
    with pytest.raises(DataFormatError, match=r"^s:4: field 'completion': missing"):
        parse_sft_row({"prompt": "a"}, tok, "s", 4)
