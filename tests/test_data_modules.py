"""Batches of the preference, prompt and SFT data modules with the tiny character-level Llama tokenizer."""

import json
from pathlib import Path

import pytest
import torch

from lit_rlhf.data.encoding import IGNORE_INDEX
from lit_rlhf.data.preferences import PreferenceDataModule, read_preferences, write_preferences
from lit_rlhf.data.prompts import PACKAGED_DIR, PromptDataModule, load_prompts
from lit_rlhf.data.rows import PreferenceExample
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.models import MINILM, TINY_LLAMA

EXAMPLES = Path(__file__).parents[1] / "lit_rlhf/data/examples"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- preferences ----------------------------------------------------------------------------------------------------


def test_preference_batches_right_padded(tmp_path, tiny_llama_path):
    rows = [
        {"prompt": "Q: sky?", "chosen": " blue", "rejected": " no", "margin": 2.0},
        {"prompt": "Q: a long question", "chosen": " yes", "rejected": " a longer rude answer"},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
    ]
    dm = PreferenceDataModule(TINY_LLAMA, train_path=write_jsonl(tmp_path / "p.jsonl", rows), max_length=12)
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


def test_val_fraction_split_is_deterministic_and_disjoint():
    def split(seed):
        path = str(EXAMPLES / "preferences_tiny.jsonl")
        dm = PreferenceDataModule(TINY_LLAMA, train_path=path, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return dm

    first, again, other = split(0), split(0), split(1)
    assert first.examples["val"] == again.examples["val"] and first.examples["train"] == again.examples["train"]
    assert len(first.examples["val"]) == 10 and len(first.examples["train"]) == 30
    assert not set(first.examples["val"]) & set(first.examples["train"])
    assert set(first.examples["val"]) != set(other.examples["val"])
    assert first.stats["train"]["held_out"] == 10 and first.stats["val"]["kept"] == 10
    assert len(first.val_dataloader()) == 2  # 10 pairs, batch size 8


def test_dataset_folder_through_load_dataset(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    write_jsonl(folder / "train.jsonl", rows)
    stats = {}
    examples = read_preferences(folder, split="train", hub_kwargs={"cache_dir": str(tmp_path / "cache")}, stats=stats)
    assert examples == [PreferenceExample(f"p{i}", "good", "bad") for i in range(3)]
    assert stats["rows"] == 3


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


# --- prompts --------------------------------------------------------------------------------------------------------


def test_packaged_prompts():
    train, heldout = load_prompts(split="train"), load_prompts(split="heldout")
    assert len(train) + len(heldout) >= 200 and 0.15 <= len(heldout) / (len(train) + len(heldout)) <= 0.25
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    normalised = {p.lower().strip(" .?!") for p in train}
    assert not normalised & {p.lower().strip(" .?!") for p in heldout}
    assert sorted(p.name for p in PACKAGED_DIR.glob("*.jsonl")) == ["heldout.jsonl", "train.jsonl"]
    with pytest.raises(ValueError, match="splits"):
        load_prompts(split="test")


def test_prompt_batches_left_padded_with_chat_template():
    dm = PromptDataModule(TINY_LLAMA, batch_size=4, shuffle=False, limit=6, val_limit=3)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 3
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    texts = load_prompts(split="train", limit=4)
    assert batch["prompt"] == texts
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, max(len(t) for t in texts) + 19)
    for row, text in enumerate(texts):
        real = batch["attention_mask"][row].bool()
        pads = (~real).sum().item()
        assert real[pads:].all() and not real[:pads].any()  # left padding
        assert batch["input_ids"][row, :pads].tolist() == [tok.pad_token_id] * pads
        # 19 template tokens: <|im_start|> "user\n" (5 chars) ... <|im_end|> "\n" <|im_start|> "assistant\n" (10)
        assert (
            tok.decode(batch["input_ids"][row, pads:]) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        )


def test_prompt_options_raw_text_system_prompt_and_truncation(tmp_path):
    path = tmp_path / "prompts.jsonl"
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
    ]
    rows = [{"prompt": "abcdef"}, {"messages": conversation}]
    write_jsonl(path, rows)
    dm = PromptDataModule(TINY_LLAMA, path=str(path), chat_template=False, max_prompt_length=4, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt"] == ["abcdef", "user: hi\nassistant: yo\nuser: more\n"]
    assert dm.tokenizer.batch_decode(batch["input_ids"]) == ["cdef", "nt: "]  # the last 4 tokens survive
    assert dm.val_dataloader() == []  # a custom source has no packaged held-out set

    sys = PromptDataModule(TINY_LLAMA, path=str(path), system_prompt="Be kind.", max_prompt_length=512)
    sys.setup("fit")
    first = sys.tokenizer.decode(sys.datasets["train"].ids[0])
    assert first.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nabcdef")


def test_prompt_module_without_chat_template_adds_cls():
    dm = PromptDataModule(MINILM, limit=2, shuffle=False, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert (batch["input_ids"][:, -1] != tok.pad_token_id).all()
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first[0] == tok.cls_token_id and tok.sep_token_id not in first


# --- SFT ------------------------------------------------------------------------------------------------------------


def test_sft_batches_mask_prompt_and_padding(tmp_path):
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "abcd", "completion": "xyz"}]
    dm = SFTDataModule(TINY_LLAMA, train_path=write_jsonl(tmp_path / "s.jsonl", rows), chat_template=False)
    dm.setup("fit")
    batch = next(iter(dm._loader("train", shuffle=False)))
    eos = dm.tokenizer.eos_token_id
    # Row 0: "abc" + EOS, 4 tokens, padded to 8; row 1: "abcdxyz" + EOS.
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 4
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 2 + [16, eos] + [IGNORE_INDEX] * 4
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 4 + [37, 38, 39, eos]


def test_sft_example_file_with_chat_template_and_val_fraction():
    dm = SFTDataModule(TINY_LLAMA, train_path=str(EXAMPLES / "sft_tiny.jsonl"), val_fraction=0.1, max_length=64)
    dm.setup("fit")
    assert dm.stats["train"] == {"rows": 40, "kept": 36, "invalid": 0, "held_out": 4}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 64
    trained = batch["labels"] != IGNORE_INDEX
    assert trained.any(dim=1).all() and (batch["attention_mask"].bool() | ~trained).all()


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    from lit_rlhf.data.loading import EpochSeededSampler

    data = list(range(10))
    first, again = EpochSeededSampler(data, seed=3), EpochSeededSampler(data, seed=3)
    epoch0 = list(first)
    assert sorted(epoch0) == data and list(again) == epoch0  # a rebuilt loader (a resumed run) replays epoch 0
    first.set_epoch(1)
    again.set_epoch(1)
    assert list(first) == list(again) != epoch0  # each epoch has its own order, also after a rebuild
    assert list(EpochSeededSampler(data, seed=4)) != epoch0


def test_length_grouped_sampler_groups_lengths_and_keeps_every_index():
    from lit_rlhf.data.loading import LengthGroupedSampler

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (203,), generator=generator).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, window_batches=5)
    order = list(sampler)
    assert sorted(order) == list(range(203))  # a permutation: nothing lost or repeated
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=1, window_batches=5)) == order  # (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 8] for i in range(0, 203, 8)]
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 3  # only the tail is short
    # The first batch holds the longest example of any full batch; padding (pad to each batch's longest) drops a lot.
    assert max(lengths[i] for i in batches[0]) == max(lengths[i] for b in batches[:-1] for i in b)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    random_order = torch.randperm(203, generator=generator).tolist()
    assert padded(batches) < 0.75 * padded([random_order[i : i + 8] for i in range(0, 203, 8)])


def test_group_by_length_in_the_preference_and_sft_modules():
    dm = PreferenceDataModule(
        TINY_LLAMA, train_path=str(EXAMPLES / "preferences_tiny.jsonl"), batch_size=4, group_by_length=True
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert type(loader.sampler).__name__ == "LengthGroupedSampler"
    assert sum(len(b["margin"]) for b in loader) == len(dm.examples["train"])
    sft = SFTDataModule(
        TINY_LLAMA, train_path=str(EXAMPLES / "sft_tiny.jsonl"), val_fraction=0.1, batch_size=4, group_by_length=True
    )
    sft.setup("fit")
    assert type(sft.train_dataloader().sampler).__name__ == "LengthGroupedSampler"
    assert type(sft.val_dataloader().sampler).__name__ == "SequentialSampler"  # evaluation keeps file order
