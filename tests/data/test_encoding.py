"""Encoders and padding on hand-worked ids: prompt/response and SFT encoding, pad_left / pad_right and the three
collators."""

from lit_rlhf.data.encoding import IGNORE_INDEX, encode_prompt_response, encode_sft
from lit_rlhf.data.rows import SFTExample, parse_sft_row
from lit_rlhf.models import MINILM, load_tokenizer
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
