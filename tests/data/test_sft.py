"""SFT batches: labels masked on the prompt and padding, and the packaged example file with the chat template."""

from lit_rlhf.data.encoding import IGNORE_INDEX
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.models import TINY_LLAMA
from tests.data.test_support import EXAMPLES, write_jsonl


def test_sft_batches_mask_prompt_and_padding(tmp_path):
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "abcd", "completion": "xyz"}]
    dm = SFTDataModule(TINY_LLAMA, train_path=str(write_jsonl(tmp_path / "s.jsonl", rows)), chat_template=False)
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
