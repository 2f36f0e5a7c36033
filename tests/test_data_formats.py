"""Row parsers, file readers and encoders of lit_rlhf.data.formats on small hand-written examples."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lit_rlhf.data.encoding import IGNORE_INDEX, encode_prompt_response, encode_sft
from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.loading import split_off
from lit_rlhf.data.preferences import read_preferences, write_preferences
from lit_rlhf.data.rows import (
    PreferenceExample,
    SFTExample,
    parse_preference_row,
    parse_sft_row,
    split_transcript_pair,
)
from lit_rlhf.data.sources import iter_rows
from lit_rlhf.models import MINILM, load_tokenizer

HH_DEV = Path(__file__).parents[2] / "shared/data/hh-rlhf-harmless-dev.jsonl.gz"

# Character tokenizer ids: specials 0-3, then string.printable from 4: "0"-"9" 4-13, "a"-"z" 14-39, "A"-"Z" 40-65,
# 32 punctuation marks 66-97, " " 98, "\n" 100. "<|im_start|>" is 2, "<|im_end|>" (EOS) 3.
A, B, C, D, E, F = 14, 15, 16, 17, 18, 19
U, V, W, X, Y, Z = 34, 35, 36, 37, 38, 39


@pytest.fixture(scope="module")
def tok(tiny_llama_path):
    return load_tokenizer(tiny_llama_path, padding_side="right")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


# --- hh-rlhf transcripts ---------------------------------------------------------------------------------------------


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


def test_hh_without_assistant_turn_names_file_line_field(tmp_path):
    # U+2028 is a line break to str.splitlines() but not to JSON lines: it must not shift the line count.
    good = {"chosen": "\n\nHuman: a\u2028\n\nAssistant: b", "rejected": "\n\nHuman: a\u2028\n\nAssistant: c"}
    bad = {"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, "", bad])  # line 2 blank, so the bad row is on line 3
    with pytest.raises(DataFormatError) as info:
        read_preferences(path)
    assert str(info.value).startswith(f"{path}:3: field 'chosen': transcript has no")
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 3, "chosen")


# --- plain and conversational ----------------------------------------------------------------------------------------


def test_plain_unicode_and_empty_texts_round_trip(tmp_path):
    rows = [
        {"prompt": "Café ☕ naïve?", "chosen": "Très bien 👍", "rejected": "Non."},
        {"prompt": "", "chosen": "", "rejected": "something"},  # empty texts are valid: an empty reply can win
    ]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    examples = read_preferences(path)
    assert examples == [
        PreferenceExample("Café ☕ naïve?", "Très bien 👍", "Non."),
        PreferenceExample("", "", "something"),
    ]
    again = read_preferences(write_preferences(examples, tmp_path / "out" / "copy.jsonl.gz"))
    assert again == examples


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


def test_conversational_without_chat_template_renders_role_lines():
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yo", "rejected": "no"}
    minilm = load_tokenizer(MINILM)
    assert minilm.chat_template is None
    expected = PreferenceExample("user: hi\nassistant: ", "yo\n", "no\n")
    assert parse_preference_row(row, minilm) == parse_preference_row(row, None) == expected


def test_conversational_reply_must_start_with_assistant():
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "n"}
    with pytest.raises(DataFormatError, match=r"field 'chosen\[0\]\.role': the reply must start with an assistant"):
        parse_preference_row(row)


# --- reading files: line numbers, identical pairs, skip_invalid ------------------------------------------------------


def test_identical_dropped_and_skip_invalid_counted(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        '{"prompt": "p2", "chosen": ',  # broken JSON
        {"prompt": "p3", "chosen": "same", "rejected": "same"},
        {"chosen": "\n\nHuman: no reply turn", "rejected": "\n\nHuman: x"},
        {"prompt": "p5", "chosen": "c", "rejected": "d"},
        [1, 2],  # not an object
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataFormatError, match=rf"^{path}:2: field '<row>': invalid JSON"):
        read_preferences(path)
    stats = {}
    examples = read_preferences(path, skip_invalid=True, stats=stats)
    assert [e.prompt for e in examples] == ["p1", "p5"]
    assert stats == {"rows": 6, "kept": 2, "invalid": 3, "identical": 1, "realigned": 0}


def test_json_array_csv_and_parquet_line_numbers(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n\n  {"prompt": "p",\n   "chosen": 1}\n]')
    with pytest.raises(DataFormatError, match=rf"^{array}:4: field 'rejected': missing"):
        read_preferences(array)

    table = tmp_path / "t.csv"
    table.write_text('prompt,chosen,rejected,margin\n"multi\nline",c,r,1\np,c,r,oops\n')
    assert [line for line, _ in iter_rows(table)] == [2, 4]
    with pytest.raises(DataFormatError, match=rf"^{table}:4: field 'margin'"):
        read_preferences(table)

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": ["c", "c"], "rejected": ["r", "c"]}), parquet)
    stats = {}
    assert read_preferences(parquet, stats=stats) == [PreferenceExample("p", "c", "r")]
    assert stats["identical"] == 1


def test_split_off_is_deterministic_and_disjoint():
    items = list(range(20))
    train, val = split_off(items, 0.25, seed=3)
    assert split_off(items, 0.25, seed=3) == (train, val)
    assert len(val) == 5 and sorted(train + val) == items and not set(train) & set(val)
    assert split_off(items, 0.25, seed=4) != (train, val)


# --- encoding --------------------------------------------------------------------------------------------------------


def test_encode_prompt_response_cuts_prompt_from_left(tok):
    # No specials in the char tokenizer: budget 6 keeps the whole response "xyz" and the last 3 prompt chars "def".
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=6) == [D, E, F, X, Y, Z]
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=8) == [B, C, D, E, F, X, Y, Z]
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=9) == [A, B, C, D, E, F, X, Y, Z]
    assert encode_prompt_response(tok, "abcdef", "xyz", max_length=50) == [A, B, C, D, E, F, X, Y, Z]
    # The response alone exceeds the budget: prompt dropped, response cut from the right to "uvwx".
    assert encode_prompt_response(tok, "ab", "uvwxyz", max_length=4) == [U, V, W, X]
    assert encode_prompt_response(tok, "ab", "c", max_length=10) == [A, B, C]


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


# --- the real hh-rlhf harmless-base test file ------------------------------------------------------------------------


@pytest.mark.skipif(not HH_DEV.exists(), reason=f"{HH_DEV} not present")
def test_real_hh_rlhf_harmless_dev_parses():
    stats = {}
    examples = read_preferences(HH_DEV, stats=stats)
    print(f"hh-rlhf harmless dev: {stats}")
    assert stats["rows"] == stats["kept"] == len(examples) == 1156
    assert stats["invalid"] == stats["identical"] == 0
    assert stats["realigned"] == 4  # rows whose chosen reply contains a further turn
    assert all(e.prompt.endswith("\n\nAssistant:") for e in examples)
