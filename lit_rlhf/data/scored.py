"""Scored responses for offline RL (ILQL): ``(prompt, response, reward)`` rows, preference pairs read as two scored
rows, the writer the pipeline stores its scored samples with, and ``ScoredDataModule``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.chat import has_chat_template, render_messages
from lit_rlhf.data.encoding import SFTCollator, encode_prompt_completion
from lit_rlhf.data.errors import ROW, DataFormatError
from lit_rlhf.data.loading import SplitDataModule
from lit_rlhf.data.rows import number, parse_messages, parse_preference_row
from lit_rlhf.data.sources import load_examples, write_json_lines
from lit_rlhf.models import load_tokenizer


@dataclass(frozen=True)
class ScoredExample:
    """One response to a prompt and the reward it earned; ``prompt`` is rendered (chat template applied), so
    ``prompt + response`` is the text the LM is trained on."""

    prompt: str
    response: str
    reward: float


def _one_of(row: Mapping[str, Any], names: tuple[str, str], file: str, line: int) -> tuple[str, Any]:
    """``(field, value)`` of whichever of two synonymous fields the row has; both is ambiguous, neither missing."""
    present = [name for name in names if row.get(name) is not None]
    if len(present) == 2:
        raise DataFormatError(file, line, names[1], f"give either '{names[0]}' or '{names[1]}', not both")
    if not present:
        raise DataFormatError(file, line, names[0], f"missing (or '{names[1]}')")
    return present[0], row[present[0]]


def parse_scored_row(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    file: str = "<input>",
    line: int = 0,
    pair_rewards: tuple[float, float] = (1.0, -1.0),
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> list[ScoredExample]:
    """Parse one row into scored examples, detecting its format from the fields present.

    - scored: ``prompt`` (text, or a message list rendered with the generation prompt as preference prompts are),
      ``response`` (or ``completion``) text and ``reward`` (or ``score``), a finite number: one example;
    - any preference row :func:`~lit_rlhf.data.rows.parse_preference_row` reads (hh-rlhf transcripts,
      ``prompt``/``chosen``/``rejected`` plain or conversational): two examples, the chosen response with
      ``pair_rewards[0]`` and the rejected one with ``pair_rewards[1]``.

    Args:
        row: The decoded row.
        tokenizer: Supplies the chat template for conversational rows; None renders them as ``"role: content"``.
        file: Source name for errors.
        line: Line (or row number) for errors.
        pair_rewards: Rewards of the chosen and the rejected response of a preference row.
        chat_template: Render a plain-text ``prompt`` as one user message with the tokenizer's chat template and
            generation prompt (after ``system_prompt``), as ``PromptDataModule`` prompts the policy; hh-rlhf
            transcripts stay as written.
        system_prompt: System message before that user message.

    Raises:
        DataFormatError: naming the file, line and field at fault.
    """
    pair = [name for name in ("chosen", "rejected") if row.get(name) is not None]
    scored = [name for name in ("response", "completion") if row.get(name) is not None]
    if pair and scored:
        raise DataFormatError(file, line, ROW, f"has both {scored[0]!r} and {pair[0]!r}: a row is scored or a pair")
    prompt = row.get("prompt")
    if chat_template and has_chat_template(tokenizer) and isinstance(prompt, str):
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        row = {**row, "prompt": [*system, {"role": "user", "content": prompt}]}
        prompt = row["prompt"]
    if pair:
        example = parse_preference_row(row, tokenizer, file, line)
        chosen, rejected = pair_rewards
        return [
            ScoredExample(example.prompt, example.chosen, chosen),
            ScoredExample(example.prompt, example.rejected, rejected),
        ]
    response_field, response = _one_of(row, ("response", "completion"), file, line)
    if not isinstance(response, str):
        raise DataFormatError(file, line, response_field, f"expected text, got {type(response).__name__}")
    reward_field, value = _one_of(row, ("reward", "score"), file, line)
    reward = number(value, reward_field, file, line)
    if prompt is None:
        raise DataFormatError(file, line, "prompt", "missing")
    if not isinstance(prompt, str):
        messages = parse_messages(prompt, "prompt", file, line)
        try:
            prompt = render_messages(messages, tokenizer, add_generation_prompt=True)
        except Exception as err:  # a template's jinja error is worth reporting with the row
            raise DataFormatError(file, line, "prompt", f"the chat template failed: {err}") from err
    return [ScoredExample(prompt, response, reward)]


def read_scored(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    pair_rewards: tuple[float, float] = (1.0, -1.0),
    chat_template: bool = False,
    system_prompt: str | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
    stats: dict[str, int] | None = None,
) -> list[ScoredExample]:
    """Read scored rows and preference rows (see :func:`parse_scored_row`) into scored examples.

    Args:
        source: A ``.jsonl`` / ``.json`` / ``.csv`` (optionally ``.gz``) / ``.parquet`` file, a dataset folder, or a
            hub dataset name.
        tokenizer: Tokenizer (or its name) whose chat template renders conversational rows.
        split: Split to load from a folder or hub dataset; ignored for files.
        skip_invalid: Skip and count bad rows instead of raising :class:`~lit_rlhf.data.errors.DataFormatError`.
        pair_rewards: Rewards of the chosen and the rejected response of a preference row.
        chat_template: Render plain-text prompts as a user message with the chat template (see
            :func:`parse_scored_row`).
        system_prompt: System message before that user message.
        hub_kwargs: Extra ``datasets.load_dataset`` arguments.
        stats: If given, filled with the counts ``rows``, ``kept`` (examples), ``invalid`` and ``pairs`` (preference
            rows, each two examples).
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, padding_side="right")

    def parse(row: Mapping[str, Any], file: str, line: int, counts: Counter) -> list[ScoredExample]:
        examples = parse_scored_row(row, tokenizer, file, line, pair_rewards, chat_template, system_prompt)
        counts["pairs"] += len(examples) == 2
        return examples

    rows, counts = load_examples(source, parse, split, skip_invalid, hub_kwargs, what="scored rows")
    examples = [example for row in rows for example in row]
    if stats is not None:
        stats.update(counts | {"kept": len(examples), "pairs": counts.get("pairs", 0)})
    return examples


def write_scored(rows: Iterable[ScoredExample], path: str | Path) -> Path:
    """Write ``{"prompt", "response", "reward"}`` JSON lines (gzip if the name ends in ``.gz``).

    :func:`read_scored` reads the file back to equal examples when it does not render the prompts again
    (``chat_template`` off): write prompts as the policy saw them, or raw prompts and read them with
    ``chat_template`` on.
    """
    return write_json_lines(
        ({"prompt": row.prompt, "response": row.response, "reward": float(row.reward)} for row in rows), path
    )


class ScoredDataset(Dataset):
    """Examples encoded on access with :func:`~lit_rlhf.data.encoding.encode_prompt_completion`."""

    def __init__(self, examples: list[ScoredExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], float]:
        example = self.examples[index]
        ids, labels = encode_prompt_completion(self.tokenizer, example.prompt, example.response, self.max_length)
        return ids, labels, example.reward

    def length(self, index: int) -> int:
        """Tokens of example ``index``."""
        return len(self[index][0])


class ScoredCollator:
    """Right-pad ``(ids, labels, reward)`` items: ``input_ids`` / ``attention_mask`` / ``labels`` (B, T) as
    :class:`~lit_rlhf.data.encoding.SFTCollator` pads them, and ``rewards`` (B,) float32."""

    def __init__(self, pad_id: int) -> None:
        self.pad = SFTCollator(pad_id)

    def __call__(self, items: list[tuple[list[int], list[int], float]]) -> dict[str, torch.Tensor]:
        batch = self.pad([(ids, labels) for ids, labels, _ in items])
        batch["rewards"] = torch.tensor([reward for _, _, reward in items], dtype=torch.float32)
        return batch


class ScoredDataModule(SplitDataModule):
    """Responses with the reward they earned, for offline RL (ILQL).

    Rows (detected per row): ``prompt`` / ``response`` (or ``completion``) / ``reward`` (or ``score``), the prompt
    text or a message list; and preference rows in any format :class:`~lit_rlhf.data.PreferenceDataModule` reads,
    each two rows rewarded ``pair_rewards``. Batches: ``input_ids``, ``attention_mask``, ``labels`` (all (B, T) long,
    right-padded; labels -100 on the prompt and padding, unshifted) and ``rewards`` (B,) float32. Per-split counts
    are in :attr:`stats` after ``setup``.
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
        pair_rewards: tuple[float, float] = (1.0, -1.0),
        chat_template: bool = False,
        system_prompt: str | None = None,
        train_split: str = "train",
        val_split: str = "test",
        test_split: str = "test",
        hub_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer of the LM: bundled name, hub id or local path (linked to the model by the CLI). Its
                chat template renders conversational rows.
            train_path: Training rows: a ``.jsonl`` / ``.json`` / ``.csv`` (``.gz`` allowed) / ``.parquet`` file, a
                dataset folder, or a hub dataset name such as ``Anthropic/hh-rlhf``.
            val_path: Validation rows, same kinds of source. Leave None to use ``val_fraction`` or no validation.
            test_path: Test rows, same kinds of source.
            val_fraction: Fraction of the training examples held out for validation (deterministic given ``seed``);
                0 disables. Cannot be combined with ``val_path``.
            seed: Seed for the validation carve-out and the training shuffle order.
            max_length: Longest encoded prompt + response; the prompt is cut from the left first, then the
                response's end.
            batch_size: Responses per batch.
            num_workers: DataLoader worker processes (0 encodes in the main process).
            group_by_length: Batch training examples of similar length together (``LengthGroupedSampler``): less
                padding, so faster steps; batches are then drawn from length-sorted windows of 50 batches.
            skip_invalid: Skip and count bad rows instead of stopping at the first with a ``DataFormatError``.
            pair_rewards: Rewards of the chosen and the rejected response of a preference row.
            chat_template: Render plain-text prompts as a user message with the tokenizer's chat template and
                generation prompt, as ``PromptDataModule`` prompts the policy: turn it on for raw prompts that the
                policy was sampled on that way, so that ILQL learns in the states it decodes from. Off, plain prompts
                are used as written (as preference prompts are).
            system_prompt: System message before that user message.
            train_split: Split name for ``train_path`` when it is a folder or hub dataset.
            val_split: Split name for ``val_path`` when it is a folder or hub dataset.
            test_split: Split name for ``test_path`` when it is a folder or hub dataset.
            hub_kwargs: Extra ``datasets.load_dataset`` arguments for folder / hub sources, e.g.
                ``{"data_dir": "harmless-base"}``.
        """
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}.")
        if len(pair_rewards) != 2 or not all(math.isfinite(r) for r in pair_rewards):
            raise ValueError(f"pair_rewards must be two finite numbers (chosen, rejected), got {pair_rewards}.")
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
        self.pair_rewards = (float(pair_rewards[0]), float(pair_rewards[1]))
        self.chat_template, self.system_prompt = chat_template, system_prompt

    def read_split(self, path: str, split_name: str, stats: dict[str, int]) -> list[ScoredExample]:
        return read_scored(
            path,
            self.tokenizer,
            split_name,
            self.skip_invalid,
            self.pair_rewards,
            self.chat_template,
            self.system_prompt,
            self.hub_kwargs,
            stats,
        )

    def make_dataset(self, examples: list[ScoredExample]) -> Dataset:
        return ScoredDataset(examples, self.tokenizer, self.max_length)

    def make_collator(self) -> ScoredCollator:
        return ScoredCollator(self.tokenizer.pad_token_id)
