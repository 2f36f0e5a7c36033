"""Chat rendering as the row parsers use it: plain role lines without a template, and replies that must start with
an assistant message."""

import pytest

from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.rows import PreferenceExample, parse_preference_row
from lit_rlhf.models import MINILM, load_tokenizer


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
