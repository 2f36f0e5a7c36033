"""Prompts for RL rollouts: ``PromptDataModule`` (left-padded batches) and the packaged prompt set."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.chat import render_messages
from lit_rlhf.data.encoding import PromptCollator, SFTCollator, encode_prompt
from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.loading import make_loader
from lit_rlhf.data.ptx import EndlessSamples, StreamLoader
from lit_rlhf.data.rows import Prompt, parse_messages
from lit_rlhf.data.sft import SFTDataset, read_sft
from lit_rlhf.data.sources import load_examples
from lit_rlhf.models import load_tokenizer, resolve

PACKAGED_DIR = Path(__file__).with_name("prompts")
"""Folder of the packaged prompt set: ``train.jsonl`` and ``heldout.jsonl``, one ``{"prompt": ...}`` per line."""
PACKAGED_SPLITS = ("train", "heldout")


def _parse_prompt(row: Mapping[str, Any], file: str, line: int, counts: Counter) -> Prompt:
    value = row.get("prompt")
    if value is None and row.get("messages") is not None:
        value, field = row["messages"], "messages"
    else:
        field = "prompt"
    if value is None:
        raise DataFormatError(file, line, "prompt", "missing (give 'prompt' text or a 'messages' list)")
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(file, line, field, "empty prompt")
        return Prompt(value)
    messages = parse_messages(value, field, file, line)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return Prompt(messages[0]["content"], tuple(messages))
    return Prompt(render_messages(messages, None), tuple(messages))


def _source(path: str | None, split: str) -> str:
    if path is not None:
        return path
    if split not in PACKAGED_SPLITS:
        raise ValueError(f"The packaged prompt set has splits {PACKAGED_SPLITS}, not {split!r}.")
    return str(PACKAGED_DIR / f"{split}.jsonl")


def read_prompts(
    path: str | None = None,
    split: str = "train",
    limit: int | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
    skip_invalid: bool = False,
) -> list[Prompt]:
    """Read prompts (``prompt`` text or ``messages`` rows) from a file, folder or hub dataset, or the packaged set.

    Args:
        path: ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, dataset folder or hub name; None for the
            packaged set.
        split: ``train`` or ``heldout`` for the packaged set; the split name for a folder or hub dataset.
        limit: Keep only the first ``limit`` prompts.
        hub_kwargs: Extra ``datasets.load_dataset`` arguments.
        skip_invalid: Skip and count bad rows (and the unreadable rest of a broken ``.gz`` archive) instead of
            raising :class:`~lit_rlhf.data.errors.DataFormatError`; the counts and first errors are logged.
    """
    source = _source(path, split)
    prompts, _ = load_examples(source, _parse_prompt, split, skip_invalid, hub_kwargs, what="prompts")
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive or None, got {limit}.")
        prompts = prompts[:limit]
    return prompts


def load_prompts(
    path: str | None = None, split: str = "train", limit: int | None = None, skip_invalid: bool = False
) -> list[str]:
    """Raw prompt texts; ``load_prompts()`` is the packaged training set.

    Args:
        path: Prompt file, dataset folder or hub name; None for the packaged set (see :func:`read_prompts`).
        split: ``train`` or ``heldout`` for the packaged set; the split name for a folder or hub dataset.
        limit: Keep only the first ``limit`` prompts.
        skip_invalid: Skip and count bad rows instead of raising :class:`~lit_rlhf.data.errors.DataFormatError`.
    """
    return [prompt.text for prompt in read_prompts(path, split, limit, skip_invalid=skip_invalid)]


class PromptDataset(Dataset):
    """Encoded prompts: items are ``(raw text, ids)``."""

    def __init__(self, texts: list[str], ids: list[list[int]]) -> None:
        self.texts, self.ids = texts, ids

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, list[int]]:
        return self.texts[index], self.ids[index]


class PromptDataModule(L.LightningDataModule):
    """Prompts for RL rollouts, left-padded for generation.

    Batches: ``prompt`` (list of B raw prompt texts, what reward functions receive), ``input_ids`` (B, P) long
    left-padded and ``attention_mask`` (B, P). Validation / test / predict iterate the evaluation prompts in order:
    ``val_path``, or the packaged ``heldout`` split when both paths are None.
    """

    def __init__(
        self,
        tokenizer: str,
        path: str | None = None,
        split: str = "train",
        val_path: str | None = None,
        val_split: str = "heldout",
        max_prompt_length: int = 256,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        chat_template: bool = True,
        system_prompt: str | None = None,
        limit: int | None = None,
        val_limit: int | None = None,
        skip_invalid: bool = False,
        num_workers: int = 0,
        hub_kwargs: dict[str, Any] | None = None,
        ptx_path: str | None = None,
        ptx_batch_size: int = 4,
        ptx_max_length: int = 256,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer of the policy: bundled name, hub id or path (linked to ``model.policy`` by the CLI).
            path: Prompt source: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file with a ``prompt`` (text) or
                ``messages`` (list of {role, content}) field, a dataset folder, or a hub dataset name. None uses the
                packaged everyday-prompt set.
            split: ``train`` or ``heldout`` for the packaged set; the split name for a folder or hub dataset.
            val_path: Evaluation prompts, same kinds of source. None: the packaged set's ``val_split`` when ``path``
                is None too, otherwise no validation.
            val_split: Split for the evaluation prompts (``heldout`` for the packaged set).
            max_prompt_length: Longest prompt in tokens after rendering; longer prompts lose their beginning.
            batch_size: Prompts per rollout batch.
            shuffle: Shuffle training prompts each epoch.
            seed: Seed of the shuffle order.
            chat_template: Wrap each prompt as a user message and render it with the tokenizer's chat template
                (``add_generation_prompt=True``); tokenizers without a template get the raw text.
            system_prompt: System message put before every prompt (a text prefix when no chat template is used).
            limit: Use only the first ``limit`` training prompts (quick runs).
            val_limit: Use only the first ``val_limit`` evaluation prompts.
            skip_invalid: Skip and count bad rows instead of stopping at the first with a ``DataFormatError`` (bad
                JSON, bytes that are not UTF-8, no prompt, the unreadable rest of a broken ``.gz`` archive); the
                counts are logged.
            num_workers: DataLoader worker processes.
            hub_kwargs: Extra ``datasets.load_dataset`` arguments for folder / hub sources.
            ptx_path: Text for PPO-ptx (``model.ptx_coef``): SFT rows (``prompt``/``completion``, ``messages``,
                hh-rlhf ``chosen``; the loss is on the completion) from a file, folder or hub dataset. Training
                batches then are ``{"prompts": <prompt batch>, "ptx": <SFT batch>}``, the ptx rows drawn without end
                in a seeded order. None: prompt batches only.
            ptx_batch_size: ptx rows per RL iteration (split across the iteration's optimizer steps).
            ptx_max_length: Longest ptx row in tokens; longer rows are cut.
        """
        super().__init__()
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}.")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.path, self.split, self.val_path, self.val_split = path, split, val_path, val_split
        self.max_prompt_length, self.batch_size, self.shuffle, self.seed = max_prompt_length, batch_size, shuffle, seed
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.limit, self.val_limit, self.num_workers, self.hub_kwargs = limit, val_limit, num_workers, hub_kwargs
        self.skip_invalid = skip_invalid
        self.ptx_path, self.ptx_batch_size, self.ptx_max_length = ptx_path, ptx_batch_size, ptx_max_length
        self.datasets: dict[str, PromptDataset] = {}
        self.ptx: SFTDataset | None = None
        """The PPO-ptx rows, read at ``setup("fit")`` when ``ptx_path`` is set."""
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (left padding), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, padding_side="left")
        return self._tokenizer

    def prepare_data(self) -> None:
        resolve(self.tokenizer_name)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._load("train")
            self._load_ptx()
        self._load("val")

    def _load_ptx(self) -> SFTDataset | None:
        if self.ptx is None and self.ptx_path is not None:
            rows = read_sft(self.ptx_path, self.tokenizer, skip_invalid=self.skip_invalid, hub_kwargs=self.hub_kwargs)
            self.ptx = SFTDataset(rows, self.tokenizer, self.ptx_max_length)
        return self.ptx

    def _load(self, which: str) -> PromptDataset | None:
        if which not in self.datasets:
            if which == "train":
                prompts = read_prompts(self.path, self.split, self.limit, self.hub_kwargs, self.skip_invalid)
            elif self.val_path is not None or self.path is None:
                prompts = read_prompts(
                    self.val_path, self.val_split, self.val_limit, self.hub_kwargs, self.skip_invalid
                )
            else:
                return None
            ids = [
                encode_prompt(self.tokenizer, p, self.max_prompt_length, self.chat_template, self.system_prompt)
                for p in prompts
            ]
            self.datasets[which] = PromptDataset([p.text for p in prompts], ids)
        return self.datasets[which]

    def _loader(self, which: str, shuffle: bool) -> DataLoader:
        dataset = self._load(which)
        if dataset is None:
            return []  # type: ignore[return-value]  # Lightning treats an empty list as "no batches"
        return make_loader(
            dataset, self.batch_size, shuffle, self.seed, self.num_workers, PromptCollator(self.tokenizer.pad_token_id)
        )

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        prompts = self._loader("train", self.shuffle)
        rows = self._load_ptx()
        if rows is None:
            return prompts
        # The collator pads on the right whatever the tokenizer's side (encoding pads nothing).
        stream = EndlessSamples(rows, self.seed)
        ptx = StreamLoader(stream, batch_size=self.ptx_batch_size, collate_fn=SFTCollator(self.tokenizer.pad_token_id))
        # min_size: the epoch is the prompts' (the endless ptx stream never ends one); prompts are drawn first.
        return CombinedLoader({"prompts": prompts, "ptx": ptx}, mode="min_size")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
