"""Scored responses (``lit_rlhf.data.scored``): row formats, preference pairs read as two rows, errors that name the
file, line and field, the writer, and ScoredDataModule batches with the tiny character-level Llama tokenizer."""

import json

import pytest
import torch

from lit_rlhf.data.encoding import encode_prompt
from lit_rlhf.data.errors import ROW, DataFormatError
from lit_rlhf.data.scored import ScoredDataModule, ScoredExample, read_scored, write_scored
from lit_rlhf.models import TINY_LLAMA
from tests.data.test_support import EXAMPLES, A, B, write_jsonl

EOS = 3


def test_scored_rows_and_their_synonyms(tmp_path, tok):
    rows = [
        {"prompt": "Q: sky?", "response": " blue", "reward": 1.5},
        {"prompt": "Q", "completion": " yes", "score": "-2"},  # CSV-style text numbers are read as numbers
        {"prompt": [{"role": "user", "content": "hi"}], "response": "hello", "reward": 0},
    ]
    examples = read_scored(write_jsonl(tmp_path / "s.jsonl", rows), tok)
    # The message prompt is rendered with the ChatML template and the generation prompt, as preference prompts are.
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert examples == [
        ScoredExample("Q: sky?", " blue", 1.5),
        ScoredExample("Q", " yes", -2.0),
        ScoredExample(chat, "hello", 0.0),
    ]


def test_chat_template_renders_plain_prompts_as_the_policy_is_prompted(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "response": "yo", "reward": 1}])
    (example,) = read_scored(path, tok, chat_template=True, system_prompt="be nice")
    # The same text PromptDataModule's encode_prompt feeds the policy, so ILQL learns in the states it decodes from.
    assert tok(example.prompt, add_special_tokens=False)["input_ids"] == encode_prompt(tok, "hi", 99, True, "be nice")
    assert example.prompt.startswith("<|im_start|>system\nbe nice<|im_end|>\n") and example.response == "yo"


def test_preference_rows_become_two_rows_with_the_pair_rewards(tmp_path, tok):
    stats = {}
    examples = read_scored(EXAMPLES / "preferences_tiny.jsonl", tok, stats=stats)
    assert stats == {"rows": 40, "kept": 80, "invalid": 0, "pairs": 40}
    chosen, rejected = examples[:2]
    assert chosen.prompt == rejected.prompt == "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert chosen.response.startswith(" Put the egg") and rejected.response == " Figure it out yourself."
    assert (chosen.reward, rejected.reward) == (1.0, -1.0)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}])
    assert [e.reward for e in read_scored(path, pair_rewards=(2.0, 0.5))] == [2.0, 0.5]


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "Q", "response": " a"}, "reward", "missing"),
        ({"prompt": "Q", "response": " a", "reward": "NaN"}, "reward", "finite"),
        ({"prompt": "Q", "response": " a", "reward": True}, "reward", "number"),
        ({"prompt": "Q", "response": " a", "score": "high"}, "score", "number"),
        ({"prompt": "Q", "response": " a", "reward": 1, "score": 1}, "score", "not both"),
        ({"prompt": "Q", "response": ["a"], "reward": 1}, "response", "text"),
        ({"response": " a", "reward": 1}, "prompt", "missing"),
        ({"prompt": [{"role": "user"}], "response": " a", "reward": 1}, "prompt[0].content", "missing"),
        ({"prompt": "Q", "response": " a", "chosen": " b", "rejected": " c"}, ROW, "scored or a pair"),
        ({"prompt": "Q", "chosen": " b"}, "rejected", "missing"),
        ({"prompt": "Q"}, "response", "missing"),
    ],
)
def test_errors_name_the_file_line_and_field(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": " fine", "reward": 0.5}, "", row])
    with pytest.raises(DataFormatError, match=reason) as error:
        read_scored(path)
    assert (error.value.file, error.value.line, error.value.field) == (str(path), 3, field)


def test_skip_invalid_counts_the_bad_rows(tmp_path):
    rows = [{"prompt": "Q", "response": " a", "reward": 1}, {"prompt": "Q", "response": " b"}]
    stats = {}
    examples = read_scored(write_jsonl(tmp_path / "s.jsonl", rows), skip_invalid=True, stats=stats)
    assert examples == [ScoredExample("Q", " a", 1.0)]
    assert stats == {"rows": 2, "kept": 1, "invalid": 1, "pairs": 0}


def test_written_rows_read_back_equal(tmp_path):
    rows = [ScoredExample("Café ☕?", " Très bien", 0.25), ScoredExample("", "", -3.0)]
    path = write_scored(rows, tmp_path / "out" / "scored.jsonl.gz")
    assert read_scored(path) == rows
    plain = write_scored(rows[:1], tmp_path / "plain.jsonl")
    assert json.loads(plain.read_text()) == {"prompt": "Café ☕?", "response": " Très bien", "reward": 0.25}


def test_batches_right_padded_with_labels_on_the_response(tmp_path, tiny_llama_path):
    rows = [{"prompt": "Q:", "response": "ab", "reward": 1}, {"prompt": "Q: long", "response": "b", "reward": -0.5}]
    dm = ScoredDataModule(TINY_LLAMA, train_path=str(write_jsonl(tmp_path / "s.jsonl", rows)), batch_size=2)
    dm.setup("fit")
    assert dm.stats["train"] == {"rows": 2, "kept": 2, "invalid": 0, "pairs": 0} and dm.val_dataloader() == []
    batch = next(iter(dm._loader("train", shuffle=False)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "rewards"}
    assert batch["rewards"].dtype == torch.float32 and batch["rewards"].tolist() == [1.0, -0.5]
    # Row 0: "Q:ab" and the EOS (5 tokens) + 4 pads to the 9 of row 1 ("Q: long" 7, "b", EOS); labels -100 on the
    # prompt and the padding, the response's ids (EOS included) elsewhere.
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 9)
    assert batch["labels"][0].tolist() == [-100, -100, A, B, EOS] + [-100] * 4
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 4
    assert batch["labels"][1].tolist() == [-100] * 7 + [B, EOS]


def test_val_fraction_and_the_packaged_example(tiny_llama_path):
    dm = ScoredDataModule(TINY_LLAMA, train_path=str(EXAMPLES / "scored_tiny.jsonl"), val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.examples["train"]) == 80 and len(dm.examples["val"]) == 20
    assert {e.reward for e in dm.examples["train"]} == {1.0, 0.0, -1.0}


def test_bad_pair_rewards_are_refused():
    with pytest.raises(ValueError, match="pair_rewards"):
        ScoredDataModule(TINY_LLAMA, pair_rewards=(1.0, float("inf")))
