"""Supervised fine-tuning data: prompt → completion batches with the loss on completion tokens only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.encoding import SFTCollator, encode_sft
from lit_rlhf.data.loading import SplitDataModule
from lit_rlhf.data.rows import SFTExample, parse_sft_row
from lit_rlhf.data.sources import load_examples
from lit_rlhf.models import load_tokenizer


def read_sft(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    chat_template: bool = True,
    system_prompt: str | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
    stats: dict[str, int] | None = None,
) -> list[SFTExample]:
    """Read SFT rows (``prompt``/``completion``, ``messages`` or hh-rlhf ``chosen``) into examples.

    Args:
        source: File, dataset folder or hub dataset name (see :func:`~lit_rlhf.data.sources.iter_rows`).
        tokenizer: Tokenizer (or name) whose chat template renders conversations; None renders ``"role: content"``.
        split: Split for folder / hub sources.
        skip_invalid: Skip and count bad rows instead of raising ``DataFormatError``.
        chat_template: Render plain ``prompt``/``completion`` rows as a user and an assistant turn.
        system_prompt: System message before the user turn of plain rows rendered with the chat template.
        hub_kwargs: Extra ``datasets.load_dataset`` arguments.
        stats: If given, filled with the counts ``rows``, ``kept``, ``invalid``.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, padding_side="right")

    def parse(row: Mapping[str, Any], file: str, line: int, counts: Counter) -> SFTExample:
        return parse_sft_row(row, tokenizer, file, line, chat_template, system_prompt)

    examples, counts = load_examples(source, parse, split, skip_invalid, hub_kwargs, what="SFT rows")
    if stats is not None:
        stats.update(counts)
    return examples


class SFTDataset(Dataset):
    """Examples encoded on access with :func:`~lit_rlhf.data.encoding.encode_sft`."""

    def __init__(self, examples: list[SFTExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return encode_sft(self.tokenizer, self.examples[index], self.max_length)

    def length(self, index: int) -> int:
        """Tokens of example ``index``."""
        return len(self[index][0])


class SFTDataModule(SplitDataModule):
    """Prompt → completion pairs for supervised fine-tuning; the loss covers completion tokens only.

    Row formats (detected per row): ``prompt``/``completion`` (or ``prompt``/``chosen``) text, rendered as a user and
    an assistant turn when ``chat_template`` and the tokenizer has one, else kept as they are after the tokenizer's
    BOS; ``messages`` conversations, trained on EVERY assistant turn; hh-rlhf ``chosen`` transcripts, trained on the
    final response. An EOS follows the completion unless the template already ends the turn with it. Batches:
    ``input_ids``, ``attention_mask``, ``labels`` (all (B, T) long, right-padded; labels -100 on prompt and padding,
    unshifted).
    """

    def __init__(
        self,
        tokenizer: str,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        group_by_length: bool = False,
        skip_invalid: bool = False,
        chat_template: bool = True,
        system_prompt: str | None = None,
        train_split: str = "train",
        val_split: str = "test",
        test_split: str = "test",
        hub_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer of the policy: bundled name, hub id or local path (linked to the model by the CLI).
            train_path: Training rows: a ``.jsonl`` / ``.json`` / ``.csv`` (``.gz`` allowed) / ``.parquet`` file, a
                dataset folder, or a hub dataset name.
            val_path: Validation rows, same kinds of source. Leave None to use ``val_fraction`` or no validation.
            test_path: Test rows, same kinds of source.
            val_fraction: Fraction of the training rows held out for validation (deterministic given ``seed``);
                0 disables. Cannot be combined with ``val_path``.
            seed: Seed for the validation carve-out and the training shuffle order.
            max_length: Longest sequence in tokens; the prompt is cut from the left first, then the completion's end.
            batch_size: Sequences per batch.
            num_workers: DataLoader worker processes.
            group_by_length: Batch training examples of similar length together (``LengthGroupedSampler``): less
                padding, so faster steps; batches are then drawn from length-sorted windows of 50 batches.
            skip_invalid: Skip and count bad rows instead of stopping at the first with a ``DataFormatError``.
            chat_template: Render plain ``prompt``/``completion`` rows with the tokenizer's chat template (keep True
                when the RL stage also uses the template, so that both stages prompt the model the same way).
            system_prompt: System message for plain rows rendered with the chat template.
            train_split: Split name for ``train_path`` when it is a folder or hub dataset.
            val_split: Split name for ``val_path`` when it is a folder or hub dataset.
            test_split: Split name for ``test_path`` when it is a folder or hub dataset.
            hub_kwargs: Extra ``datasets.load_dataset`` arguments for folder / hub sources.
        """
        super().__init__()
        self.save_hyperparameters()
        self.configure_splits(
            tokenizer,
            {"train": train_path, "val": val_path, "test": test_path},
            {"train": train_split, "val": val_split, "test": test_split},
            val_fraction,
            seed,
            batch_size,
            num_workers,
            group_by_length,
        )
        self.max_length, self.skip_invalid, self.hub_kwargs = max_length, skip_invalid, hub_kwargs
        self.chat_template, self.system_prompt = chat_template, system_prompt

    def read_split(self, path: str, split_name: str, stats: dict[str, int]) -> list[SFTExample]:
        return read_sft(
            path,
            self.tokenizer,
            split_name,
            self.skip_invalid,
            self.chat_template,
            self.system_prompt,
            self.hub_kwargs,
            stats,
        )

    def make_dataset(self, examples: list[SFTExample]) -> Dataset:
        return SFTDataset(examples, self.tokenizer, self.max_length)

    def make_collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)
