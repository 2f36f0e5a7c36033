"""Preference pairs: reading and writing them, and PreferenceDataModule batches with the tiny character-level Llama
tokenizer."""

import json

import torch

from lit_rlhf.data.preferences import PreferenceDataModule, read_preferences, write_preferences
from lit_rlhf.data.rankings import RankingExample
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


RANKINGS = [
    {"prompt": "Q: sky?", "responses": [" blue", " no", " grey"], "ranking": [0, 2, 1]},
    {"prompt": "Q", "chosen": " yes", "rejected": " a rude answer", "margin": 1.0},  # a pair among rankings
    {"prompt": "Q: 4?", "responses": [" a", " b", " c", " d"], "scores": [1, 3, 3, 0]},
    {"prompt": "tie", "responses": [" x", " y"], "scores": [2, 2]},  # nothing to prefer: dropped
]


def test_a_file_with_rankings_reads_its_pairs_as_rankings_of_two(tmp_path):
    stats = {}
    examples = read_preferences(write_jsonl(tmp_path / "r.jsonl", RANKINGS), stats=stats)
    assert stats == {"rows": 4, "kept": 3, "invalid": 0, "identical": 1, "realigned": 0, "rankings": 3, "merged": 0}
    assert examples == [
        RankingExample("Q: sky?", (" blue", " no", " grey"), (2.0, 0.0, 1.0)),
        RankingExample("Q", (" yes", " a rude answer"), (1.0, 0.0), 1.0),
        RankingExample("Q: 4?", (" a", " b", " c", " d"), (1.0, 3.0, 3.0, 0.0)),
    ]
    # Written back (the pair with its margin as a pair row) and read again: the same examples.
    copy = write_preferences(examples, tmp_path / "copy.jsonl")
    assert json.loads(copy.read_text().splitlines()[1]) == RANKINGS[1]
    assert read_preferences(copy) == examples


def test_ranking_batches_hold_every_response_once_and_pad_k(tmp_path):
    path = str(write_jsonl(tmp_path / "r.jsonl", RANKINGS))
    dm = PreferenceDataModule(TINY_LLAMA, train_path=path, max_length=12, batch_size=2)
    dm.setup("fit")
    first, second = dm._loader("train", shuffle=False)
    assert set(first) == {"input_ids", "attention_mask", "response_mask", "scores", "margin"}
    # Batch 1: the 3-response ranking and the pair: 3 + 2 = 5 sequences, K = 3 slots, the pair's third empty.
    assert first["input_ids"].shape == first["attention_mask"].shape == (5, 12)
    assert first["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    # Levels among the row's distinct scores: " blue" 2, " no" 0, " grey" 1; the pair 1 over 0.
    assert first["scores"].tolist() == [[2.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert first["margin"].tolist() == [0.0, 1.0]
    tok = dm.tokenizer
    pieces = zip(first["input_ids"], first["attention_mask"], strict=True)
    texts = [tok.decode(ids[mask.bool()]) for ids, mask in pieces]
    # Rows in order, each response once; "Q" + " a rude answer" is 15 chars, so the prompt and 2 chars go.
    assert texts == ["Q: sky? blue", "Q: sky? no", "Q: sky? grey", "Q yes", " a rude answ"]
    # Batch 2: one ranking of 4 whose scores [1, 3, 3, 0] become levels [1, 2, 2, 0].
    assert second["input_ids"].shape[0] == 4 and second["response_mask"].tolist() == [[True] * 4]
    assert second["scores"].tolist() == [[1.0, 2.0, 2.0, 0.0]]


def test_rankings_split_group_by_length_and_resume(tmp_path):
    rows = [{"prompt": f"q{i}", "responses": [" a" * (i + 1), " b"], "ranking": [1, 0]} for i in range(10)]
    path = str(write_jsonl(tmp_path / "r.jsonl", rows))
    dm = PreferenceDataModule(TINY_LLAMA, train_path=path, val_fraction=0.2, batch_size=2, group_by_length=True)
    dm.setup("fit")
    assert (len(dm.examples["train"]), len(dm.examples["val"])) == (8, 2)
    assert all(isinstance(e, RankingExample) for split in ("train", "val") for e in dm.examples[split])
    loader = dm.train_dataloader()
    batches = list(loader)
    assert sum(len(b["response_mask"]) for b in batches) == 8
    # The longest ranking (longest " a a ..." response among the training rows) comes first.
    longest = max(dm.train_dataloader().dataset.length(i) for i in range(8))
    assert batches[0]["input_ids"].shape[1] == longest
    # A loader restored after the first batch continues with the second.
    state = {"epoch": loader.sampler_epoch(), "batches": 1}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 3 and torch.equal(rest[0]["input_ids"], batches[1]["input_ids"])
