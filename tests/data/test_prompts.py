"""Prompts for RL: the packaged prompt set, PromptDataModule batches (left padding, chat template, raw text,
system prompt, truncation) and bad prompt rows skipped on request."""

import pytest

from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.prompts import PACKAGED_DIR, PromptDataModule, load_prompts, read_prompts
from lit_rlhf.models import MINILM, TINY_LLAMA
from tests.data.test_support import write_bytes, write_jsonl


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


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.jsonl.gz"])
def test_bad_prompt_rows_skipped_on_request(tmp_path, name):
    # Line 2 is "café" saved as latin-1, line 3 has no prompt.
    lines = [b'{"prompt": "first"}', b'{"prompt": "caf\xe9"}', b"{}", b'{"prompt": "last"}']
    path = str(write_bytes(tmp_path / name, lines))
    with pytest.raises(DataFormatError, match=f"^{path}:2: field '<row>': not valid UTF-8: byte 0xe9 at column 16"):
        read_prompts(path)
    assert [p.text for p in read_prompts(path, skip_invalid=True)] == ["first", "last"]
    assert load_prompts(path, skip_invalid=True) == ["first", "last"]
    dm = PromptDataModule(TINY_LLAMA, path=path, skip_invalid=True, shuffle=False)
    dm.setup("fit")
    assert dm.datasets["train"].texts == ["first", "last"]
