"""Preference pairs: reading and writing them, and PreferenceDataModule batches with the tiny character-level Llama
tokenizer."""

import json

import torch

from lit_rlhf.data.preferences import PreferenceDataModule, read_preferences, write_preferences
from lit_rlhf.data.rows import PreferenceExample
from lit_rlhf.models import TINY_LLAMA
from tests.data.test_support import EXAMPLES, write_jsonl


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


def test_preference_batches_right_padded(tmp_path, tiny_llama_path):
    rows = [
        {"prompt": "Q: sky?", "chosen": " blue", "rejected": " no", "margin": 2.0},
        {"prompt": "Q: a long question", "chosen": " yes", "rejected": " a longer rude answer"},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
    ]
    dm = PreferenceDataModule(TINY_LLAMA, train_path=str(write_jsonl(tmp_path / "p.jsonl", rows)), max_length=12)
    dm.setup("fit")
    assert dm.stats["train"] == {"rows": 3, "kept": 2, "invalid": 0, "identical": 1, "realigned": 0}
    assert dm.val_dataloader() == []
    batch = next(iter(dm._loader("train", shuffle=False)))
    keys = {"chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask", "margin"}
    assert set(batch) == keys
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, 12)
    assert batch["chosen_input_ids"].dtype == torch.long
    assert batch["margin"].tolist() == [2.0, 0.0]
    tok = dm.tokenizer
    # Row 0 chosen: "Q: sky? blue" is 12 chars, no padding; rejected "Q: sky? no" is 10 chars + 2 right pads.
    assert tok.decode(batch["chosen_input_ids"][0]) == "Q: sky? blue"
    assert batch["rejected_attention_mask"][0].tolist() == [1] * 10 + [0] * 2
    assert batch["rejected_input_ids"][0, 10:].tolist() == [tok.pad_token_id] * 2
    # Row 1 rejected is 18 + 21 chars: the prompt is cut from the left, the 21-char response would not fit in 12
    # so it keeps its first 12 chars.
    assert tok.decode(batch["rejected_input_ids"][1]) == " a longer ru"
    assert tok.decode(batch["chosen_input_ids"][1][batch["chosen_attention_mask"][1].bool()]) == "question yes"


def test_written_pairs_read_back_by_datamodule(tmp_path):
    pairs = [PreferenceExample("hi", " there", " go", 1.0), PreferenceExample("yo", " ok", " no")]
    path = write_preferences(pairs, tmp_path / "collected.jsonl")
    assert json.loads(path.read_text().splitlines()[1]) == {"prompt": "yo", "chosen": " ok", "rejected": " no"}
    dm = PreferenceDataModule(TINY_LLAMA, train_path=str(path), batch_size=2)
    dm.setup("fit")
    assert dm.examples["train"] == pairs


def test_example_preferences_are_hh_transcripts():
    stats = {}
    examples = read_preferences(EXAMPLES / "preferences_tiny.jsonl", stats=stats)
    assert stats == {"rows": 40, "kept": 40, "invalid": 0, "identical": 0, "realigned": 0}
    assert all(e.prompt.startswith("\n\nHuman: ") and e.prompt.endswith("\n\nAssistant:") for e in examples)
