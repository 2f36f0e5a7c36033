"""Preferences for reward-model training, as pairs or K-wise rankings: read/write functions and
``PreferenceDataModule``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.encoding import (
    PreferenceCollator,
    encode_prompt_completion,
    encode_prompt_response,
    encode_prompt_responses,
)
from lit_rlhf.data.loading import SplitDataModule
from lit_rlhf.data.rankings import RankingExample, is_ranking_row, parse_ranking_row, ranking_from_pair
from lit_rlhf.data.rows import PreferenceExample, parse_preference_row
from lit_rlhf.data.sources import load_examples, write_json_lines
from lit_rlhf.models import load_tokenizer

PreferenceEncoding = Literal["reward_model", "causal_lm"]
"""How ``PreferenceDataModule`` encodes a response: for a reward model to score, or for a causal LM to score."""


def read_preferences(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    hub_kwargs: Mapping[str, Any] | None = None,
    stats: dict[str, int] | None = None,
) -> list[PreferenceExample] | list[RankingExample]:
    """Read a preference file (or ``datasets`` source) into examples, dropping those with nothing to prefer.

    Pair rows give :class:`~lit_rlhf.data.rows.PreferenceExample` examples. When any row is a ranking (it has
    ``responses``), every example is a :class:`~lit_rlhf.data.rankings.RankingExample`, each pair a ranking of two
    (:func:`~lit_rlhf.data.rankings.ranking_from_pair`), so that one source gives batches of one kind.

    Args:
        source: A ``.jsonl`` / ``.json`` / ``.csv`` (optionally ``.gz``) / ``.parquet`` file, a dataset folder, or a hub
            dataset name. Row formats are detected per row (see :func:`~lit_rlhf.data.rows.parse_preference_row` and
            :func:`~lit_rlhf.data.rankings.parse_ranking_row`).
        tokenizer: Tokenizer (or its name) whose chat template renders conversational rows; None renders them as
            ``"role: content"`` lines.
        split: Split to load from a folder or hub dataset; ignored for files.
        skip_invalid: Skip and count bad rows instead of raising :class:`~lit_rlhf.data.errors.DataFormatError`.
        hub_kwargs: Extra ``datasets.load_dataset`` arguments (``data_dir``, ``name``, ``revision`` ...).
        stats: If given, filled with the counts ``rows``, ``kept``, ``invalid``, ``identical`` (pairs with identical
            responses, rankings whose responses all tie), ``realigned``; and, when the source holds rankings,
            ``rankings`` (ranking rows read) and ``merged`` (responses merged into an identical one of their row).
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, padding_side="right")

    def parse(
        row: Mapping[str, Any], file: str, line: int, counts: Counter
    ) -> PreferenceExample | RankingExample | None:
        if is_ranking_row(row):
            ranking = parse_ranking_row(row, tokenizer, file, line, counts)
            counts["rankings"] += 1
            if not ranking.pairs:
                counts["identical"] += 1
                return None
            return ranking
        example = parse_preference_row(row, tokenizer, file, line, counts)
        if example.chosen == example.rejected:
            counts["identical"] += 1
            return None
        return example

    examples, counts = load_examples(source, parse, split, skip_invalid, hub_kwargs, what="preference rows")
    if any(isinstance(example, RankingExample) for example in examples):
        examples = [e if isinstance(e, RankingExample) else ranking_from_pair(e) for e in examples]
    if stats is not None:
        keys = ["rows", "kept", "invalid", "identical", "realigned"]
        if counts.get("rankings"):
            keys += ["rankings", "merged"]
        stats.update({key: counts.get(key, 0) for key in keys})
    return examples


def write_preferences(examples: Iterable[PreferenceExample | RankingExample], path: str | Path) -> Path:
    """Write JSON lines (gzip if the name ends in ``.gz``): pairs as ``{"prompt", "chosen", "rejected"[, "margin"]}``,
    rankings as ``{"prompt", "responses", "scores"}``.

    :class:`PreferenceDataModule` and :func:`read_preferences` read the file back to equal examples; ``margin`` is
    written only when it is not 0, and a ranking of two with a margin (a pair read among rankings) as the pair it was.
    """

    def row(example: PreferenceExample | RankingExample) -> dict[str, Any]:
        if isinstance(example, RankingExample) and example.margin and len(example.responses) == 2:
            (better, worse), *_ = example.pairs
            responses = example.responses
            example = PreferenceExample(example.prompt, responses[better], responses[worse], example.margin)
        fields: dict[str, Any] = {"prompt": example.prompt}
        if isinstance(example, RankingExample):
            return fields | {"responses": list(example.responses), "scores": list(example.scores)}
        fields |= {"chosen": example.chosen, "rejected": example.rejected}
        return fields | ({"margin": example.margin} if example.margin else {})

    return write_json_lines(map(row, examples), path)


class PreferenceDataset(Dataset):
    """Examples encoded on access with :func:`~lit_rlhf.data.encoding.encode_prompt_response`."""

    def __init__(self, examples: list[PreferenceExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {
            "chosen_input_ids": encode_prompt_response(self.tokenizer, example.prompt, example.chosen, self.max_length),
            "rejected_input_ids": encode_prompt_response(
                self.tokenizer, example.prompt, example.rejected, self.max_length
            ),
            "margin": example.margin,
        }

    def length(self, index: int) -> int:
        """Tokens of the longer side of pair ``index`` (what its batch pads to)."""
        item = self[index]
        return max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"]))


class PolicyPreferenceDataset(PreferenceDataset):
    """Pairs encoded on access for a causal LM (DPO): each side is the prompt and its response as one sequence with
    labels on the response only (:func:`~lit_rlhf.data.encoding.encode_prompt_completion`); ``index`` names the
    example, so that per-example values (cached reference log-probs) can be looked up."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        item: dict[str, Any] = {"index": index, "margin": example.margin}
        for side, response in (("chosen", example.chosen), ("rejected", example.rejected)):
            ids, labels = encode_prompt_completion(self.tokenizer, example.prompt, response, self.max_length)
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
        return item


class RankingDataset(Dataset):
    """Rankings encoded on access: the prompt tokenised once, each response once
    (:func:`~lit_rlhf.data.encoding.encode_prompt_responses`)."""

    def __init__(self, examples: list[RankingExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {
            "input_ids": encode_prompt_responses(self.tokenizer, example.prompt, example.responses, self.max_length),
            "scores": list(example.scores),
            "margin": example.margin,
        }

    def length(self, index: int) -> int:
        """Tokens of the longest response of ranking ``index`` (what its batch pads to)."""
        return max(len(ids) for ids in self[index]["input_ids"])


class PreferenceDataModule(SplitDataModule):
    """Preferences for reward-model training (and, with ``encoding="causal_lm"``, for DPO): pairs (chosen / rejected
    responses to one prompt) or K-wise rankings (K >= 2 responses to one prompt, ranked or scored).

    Reads hh-rlhf transcripts, ``prompt``/``chosen``/``rejected`` plain text or conversational message lists, with an
    optional ``margin`` column, and ``prompt``/``responses`` rows with a ``ranking`` or ``scores``, detected per row.
    A source with only pairs gives pair batches: ``chosen_input_ids``, ``chosen_attention_mask``,
    ``rejected_input_ids``, ``rejected_attention_mask`` (all (B, T) long, right-padded to one T) and ``margin`` (B,)
    float. A source with any ranking gives ranking batches, its pairs read as rankings of two (see
    :class:`~lit_rlhf.data.encoding.RankingCollator`): ``input_ids`` / ``attention_mask`` (N, T) with every response of
    the batch once, ``response_mask`` (B, K) bool, ``scores`` (B, K) and ``margin`` (B,). ``encoding="causal_lm"``
    adds ``chosen_labels`` / ``rejected_labels`` (B, T) and ``index`` (B,) to pair batches. Per-split counts are in
    :attr:`stats` after ``setup``.
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
        encoding: PreferenceEncoding = "reward_model",
        skip_invalid: bool = False,
        train_split: str = "train",
        val_split: str = "test",
        test_split: str = "test",
        hub_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer of the reward model: bundled name, hub id or local path (linked to the model's
                backbone by the CLI). Its chat template renders conversational rows.
            train_path: Training pairs or rankings: a ``.jsonl`` / ``.json`` / ``.csv`` (``.gz`` allowed) /
                ``.parquet`` file, a dataset folder, or a hub dataset name such as ``Anthropic/hh-rlhf``.
            val_path: Validation pairs or rankings, same kinds of source. Leave None to use ``val_fraction`` or no
                validation.
            test_path: Test pairs or rankings, same kinds of source.
            val_fraction: Fraction of the training rows held out for validation (deterministic given ``seed``);
                0 disables. Cannot be combined with ``val_path``.
            seed: Seed for the validation carve-out and the training shuffle order.
            max_length: Longest encoded prompt + response; the prompt is cut from the left to keep the response.
            batch_size: Pairs or rankings per batch (a ranking of K responses is K sequences in the forward pass).
            num_workers: DataLoader worker processes (0 encodes in the main process).
            group_by_length: Batch training examples of similar length together (``LengthGroupedSampler``): less
                padding, so faster steps; batches are then drawn from length-sorted windows of 50 batches.
            encoding: What the batches feed. ``reward_model``: each response with its prompt as one input with the
                tokenizer's pair special tokens, to be scored (reward models). ``causal_lm``: each side as a causal-LM
                sequence with ``{chosen,rejected}_labels`` on the response only and the example's ``index``, to be
                likelihood-scored (DPO; ``lit-rlhf dpo`` sets it); pairs only.
            skip_invalid: Skip and count bad rows instead of stopping at the first with a ``DataFormatError``.
            train_split: Split name for ``train_path`` when it is a folder or hub dataset.
            val_split: Split name for ``val_path`` when it is a folder or hub dataset.
            test_split: Split name for ``test_path`` when it is a folder or hub dataset.
            hub_kwargs: Extra ``datasets.load_dataset`` arguments for folder / hub sources, e.g.
                ``{"data_dir": "harmless-base"}``.
        """
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}.")
        if encoding not in ("reward_model", "causal_lm"):
            raise ValueError(f"encoding must be 'reward_model' or 'causal_lm', got {encoding!r}.")
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
        self.encoding = encoding

    def read_split(self, path: str, split_name: str, stats: dict[str, int]) -> list[PreferenceExample]:
        return read_preferences(path, self.tokenizer, split_name, self.skip_invalid, self.hub_kwargs, stats=stats)

    def make_dataset(self, examples: list[PreferenceExample] | list[RankingExample]) -> Dataset:
        rankings = bool(examples) and isinstance(examples[0], RankingExample)
        if self.encoding == "causal_lm":
            if rankings:
                raise ValueError(
                    "PreferenceDataModule(encoding='causal_lm') reads preference pairs; this source holds rankings "
                    "(rows with 'responses'). Write each ranking's pairs as prompt/chosen/rejected rows instead."
                )
            return PolicyPreferenceDataset(examples, self.tokenizer, self.max_length)
        return (RankingDataset if rankings else PreferenceDataset)(examples, self.tokenizer, self.max_length)

    def make_collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id)
