"""All tokenisation and padding of the data pipeline: the encoders that turn prompts, preference pairs and rankings and
SFT examples into token ids, and the collators that pad them into batches."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.chat import has_chat_template, render_messages
from lit_rlhf.data.rows import Prompt, SFTExample

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and so every HF causal LM) leaves out of the loss."""

# ---------------------------------------------------------------------------------------------------------------------
# Encoding

_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_token_template(tokenizer: PreTrainedTokenizerBase, pair: bool) -> list[list[int]]:
    """The special ids a tokenizer adds around one sequence (``[before, after]``) or a pair (``[before, middle,
    after]``), e.g. BERT ``[[CLS], [SEP], [SEP]]``; a tokenizer that adds nothing gives empty lists.

    Read off the tokenizer's own post-processor by encoding a probe, because transformers 5 fast tokenizers no longer
    offer ``build_inputs_with_special_tokens``.
    """
    cache = _TEMPLATES.setdefault(tokenizer, {})
    if pair not in cache:
        encoding = tokenizer("a", "b") if pair else tokenizer("a")
        parts: list[list[int]] = [[]]
        seen: set[int] = set()
        for token, sequence in zip(encoding["input_ids"], encoding.sequence_ids(), strict=True):
            if sequence is None:
                parts[-1].append(token)
            elif sequence not in seen:  # the first token of a text sequence opens the next gap
                seen.add(sequence)
                parts.append([])
        cache[pair] = parts + [[] for _ in range(3 + pair - 1 - len(parts))]
    return cache[pair]


def build_with_special_tokens(tokenizer: PreTrainedTokenizerBase, first: list[int], second: list[int]) -> list[int]:
    """``tokenizer.build_inputs_with_special_tokens(first, second)``, also for tokenizers that lack the method."""
    if hasattr(type(tokenizer), "build_inputs_with_special_tokens"):
        return tokenizer.build_inputs_with_special_tokens(first, second)
    before, middle, after = special_token_template(tokenizer, pair=True)
    return [*before, *first, *middle, *second, *after]


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (special tokens written in the text are still parsed)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> list[int]:
    """Reward-model input ids for ``(prompt, response)``, at most ``max_length`` long.

    Both texts are tokenised without special tokens; the prompt is cut from the LEFT so the response (what is being
    judged) survives, and the response is cut from the right only if it alone exceeds the budget; then the tokenizer's
    pair special tokens are added. Reward training and :class:`lit_rlhf.reward.RewardModel` scoring both call this,
    so they see identical inputs.
    """
    return encode_prompt_responses(tokenizer, prompt, [response], max_length)[0]


def encode_prompt_responses(
    tokenizer: PreTrainedTokenizerBase, prompt: str, responses: Sequence[str], max_length: int
) -> list[list[int]]:
    """:func:`encode_prompt_response` of each response to one prompt, the prompt tokenised once."""
    if hasattr(type(tokenizer), "build_inputs_with_special_tokens"):
        specials = tokenizer.num_special_tokens_to_add(pair=True)
    else:
        specials = sum(len(part) for part in special_token_template(tokenizer, pair=True))
    budget = max_length - specials
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for text after the special tokens; raise it.")
    prompt_ids = tokenize(tokenizer, prompt)
    encoded = []
    for response in responses:
        response_ids = tokenize(tokenizer, response)[:budget]
        keep = budget - len(response_ids)
        kept = prompt_ids[max(0, len(prompt_ids) - keep) :] if keep > 0 else []
        encoded.append(build_with_special_tokens(tokenizer, kept, response_ids))
    return encoded


def encode_sft(tokenizer: PreTrainedTokenizerBase, example: SFTExample, max_length: int) -> tuple[list[int], list[int]]:
    """Input ids and labels (``-100`` outside the trained pieces) for one SFT example, at most ``max_length`` long.

    Untemplated text gets the tokenizer's leading special tokens (BOS); an EOS is appended after the last trained
    piece unless that piece already ends with it (a ChatML reply ends with ``<|im_end|>``, the EOS of such models).
    If too long, tokens before the last trained piece are cut from the left first (keeping the leading special
    tokens), then the last piece from the right. Labels are not shifted: HF causal LMs shift them internally.
    """
    prefix = [] if example.templated else special_token_template(tokenizer, pair=False)[0]
    ids: list[int] = list(prefix)
    labels: list[int] = [IGNORE_INDEX] * len(prefix)
    last_start = len(ids)
    for text, target in example.segments:
        piece = tokenize(tokenizer, text)
        if target:
            last_start = len(ids)
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    eos = tokenizer.eos_token
    if eos is not None and not example.completion.rstrip().endswith(eos):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if len(prefix) >= max_length:
        raise ValueError(f"max_length={max_length} leaves no room after the leading special tokens; raise it.")
    excess = len(ids) - max_length
    if excess > 0:
        cut = min(excess, last_start - len(prefix))
        ids = prefix + ids[len(prefix) + cut :]
        labels = labels[: len(prefix)] + labels[len(prefix) + cut :]
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Causal-LM input ids and labels for a rendered ``prompt`` and the ``completion`` that follows it, as
    :func:`encode_sft` encodes one trained piece: labels only on the completion (and the EOS it gets), the prompt cut
    from the left when too long. DPO and ILQL encode their responses with this, so they see what SFT trains on.

    A prompt already rendered by a chat template starts with the tokenizer's leading special tokens (Llama-3's
    ``<|begin_of_text|>``); it gets no second copy of them.
    """
    prefix = special_token_template(tokenizer, pair=False)[0]
    templated = bool(prefix) and prompt.startswith(tokenizer.decode(prefix))
    return encode_sft(tokenizer, SFTExample(((prompt, False), (completion, True)), templated=templated), max_length)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt | str,
    max_prompt_length: int,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[int]:
    """Generation-ready ids for one prompt, the last ``max_prompt_length`` tokens kept.

    With ``chat_template`` and a tokenizer that has one, the prompt becomes a user message (after ``system_prompt``)
    rendered with ``add_generation_prompt=True``. Otherwise the raw text (``system_prompt`` and a blank line before
    it) gets the tokenizer's leading special tokens, which left truncation keeps.
    """
    if isinstance(prompt, str):
        prompt = Prompt(prompt)
    messages = list(prompt.messages or [{"role": "user", "content": prompt.text}])
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if chat_template and has_chat_template(tokenizer):
        return tokenize(tokenizer, render_messages(messages, tokenizer, add_generation_prompt=True))[
            -max_prompt_length:
        ]
    if prompt.messages is None:
        text = f"{system_prompt}\n\n{prompt.text}" if system_prompt else prompt.text
    else:
        text = render_messages(messages, None, add_generation_prompt=True)
    prefix = special_token_template(tokenizer, pair=False)[0]
    if len(prefix) >= max_prompt_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} leaves no room after the leading special tokens.")
    return prefix + tokenize(tokenizer, text)[-(max_prompt_length - len(prefix)) :]


# ---------------------------------------------------------------------------------------------------------------------
# Padding and batching


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to the longest. Shape: (B, P) ids and (B, P) attention mask (1 on real tokens)."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, length - len(sequence) :] = 1
    return ids, mask


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to ``length``, or to the longest when None.

    Shape: (B, length) ids and (B, length) attention mask (1 on real tokens).
    """
    if length is None:
        length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


class PromptCollator:
    """Batch prompts: ``{"prompt": list[str], "input_ids": (B, P) left-padded, "attention_mask": (B, P)}``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[str, list[int]]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_left([ids for _, ids in items], self.pad_id)
        return {"prompt": [text for text, _ in items], "input_ids": input_ids, "attention_mask": attention_mask}


class PreferenceCollator:
    """Batch preference items; chosen and rejected are padded to one common length so a model can stack them:
    ``{chosen,rejected}_{input_ids,attention_mask}`` (B, T) and ``margin`` (B,); causal-LM items add
    ``{chosen,rejected}_labels`` (B, T), -100 on prompt and padding, and ``index`` (B,) long. Ranking items (with
    ``input_ids``) are batched as :class:`RankingCollator` does."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "input_ids" in items[0]:
            return RankingCollator(self.pad_id)(items)
        length = max(len(item[key]) for item in items for key in ("chosen_input_ids", "rejected_input_ids"))
        batch = {"margin": torch.tensor([item["margin"] for item in items], dtype=torch.float32)}
        for side in ("chosen", "rejected"):
            ids, mask = pad_right([item[f"{side}_input_ids"] for item in items], self.pad_id, length)
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = ids, mask
            if f"{side}_labels" in items[0]:  # causal-LM items (DPO)
                batch[f"{side}_labels"] = pad_right([item[f"{side}_labels"] for item in items], IGNORE_INDEX, length)[0]
        if "index" in items[0]:
            batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


class RankingCollator:
    """Batch ranking items (``input_ids``: K_b id lists, ``scores``: K_b floats, ``margin``), K_b varying per item.

    ``input_ids`` / ``attention_mask`` (N, T), N = Σ K_b: every response of the batch once, item by item, right-padded
    to one T, so a model scores each response in one forward and spends none on empty slots. ``response_mask``
    (B, K) bool, K = max K_b, marks the slots that hold a response (the first K_b of row b, where ``masked_scatter``
    puts the N rewards back). ``scores`` (B, K) float32 orders them: a response's level among the distinct scores of
    its row, 0 the lowest (0 in empty slots). ``margin`` (B,) float32.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([ids for item in items for ids in item["input_ids"]], self.pad_id)
        k = max(len(item["scores"]) for item in items)
        response_mask = torch.zeros((len(items), k), dtype=torch.bool)
        scores = torch.zeros((len(items), k), dtype=torch.float32)
        for row, item in enumerate(items):
            response_mask[row, : len(item["scores"])] = True
            # Levels, not the scores themselves: only the order counts, and small integers stay exact in float32.
            levels = sorted(set(item["scores"]))
            scores[row, : len(item["scores"])] = torch.tensor([levels.index(s) for s in item["scores"]])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "scores": scores,
            "margin": torch.tensor([item["margin"] for item in items], dtype=torch.float32),
        }


class SFTCollator:
    """Right-pad ``(ids, labels)`` items: ``input_ids`` / ``attention_mask`` / ``labels`` (B, T), labels -100 on pad."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([ids for ids, _ in items], self.pad_id)
        labels, _ = pad_right([target for _, target in items], IGNORE_INDEX, input_ids.shape[1])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
