"""Row formats for preference, SFT and prompt data: file reading, validation with precise errors, chat rendering,
and the one prompt/response encoder shared by reward-model training and scoring."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import random
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ASSISTANT_MARKER = "\n\nAssistant:"
"""Opens an assistant turn in an hh-rlhf transcript; the prompt ends with the last one."""

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and so every HF causal LM) leaves out of the loss."""

ROW = "<row>"
"""Field name used in errors about a whole row (bad JSON, unknown format)."""

Message = dict[str, str]
T = TypeVar("T")


class DataFormatError(ValueError):
    """Bad input data; the message starts with ``"{file}:{line}: field '{field}': "``.

    ``line`` is the line where the row starts for JSON lines, JSON arrays and CSV, and the 1-based row number for
    parquet files and ``datasets`` sources.
    """

    def __init__(self, file: str, line: int, field: str, reason: str) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, reason
        super().__init__(f"{file}:{line}: field '{field}': {reason}")


@dataclass(frozen=True)
class PreferenceExample:
    """One comparison: a prompt and two responses, already rendered as text (chat template applied).

    ``prompt + chosen`` is the full chosen text the reward model sees (likewise for ``rejected``).
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    """How much better ``chosen`` is (optional; Llama-2-style margin loss). 0 when the data has none."""


@dataclass(frozen=True)
class SFTExample:
    """One supervised sequence as text pieces; the loss covers only the pieces marked ``True``.

    ``templated`` says the text was rendered by a chat template, which writes its own special tokens (so no BOS is
    added when encoding).
    """

    segments: tuple[tuple[str, bool], ...]
    templated: bool = False

    @property
    def prompt(self) -> str:
        """Everything before the final trained piece."""
        last = max(i for i, (_, target) in enumerate(self.segments) if target)
        return "".join(text for text, _ in self.segments[:last])

    @property
    def completion(self) -> str:
        """The final trained piece (the last assistant turn)."""
        return next(text for text, target in reversed(self.segments) if target)


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows


def source_label(source: str | Path, split: str) -> str:
    """How a source appears in error messages: the file path, or ``name[split]`` for ``datasets`` sources."""
    path = Path(source)
    if path.is_file():
        return str(source)
    return f"{source}[{split}]"


def _open_text(path: Path, newline: str) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)


def _format_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for fmt in ("jsonl", "json", "csv", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    raise ValueError(f"{path}: unknown file type; use .jsonl, .json, .csv or .parquet (.gz allowed for text files).")


def iter_rows(
    source: str | Path, split: str = "train", hub_kwargs: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    """Yield ``(line, row)`` from a local file, a local dataset folder, or a hub dataset name.

    Local files: ``.jsonl`` / ``.json`` (JSON lines or one array) / ``.csv`` (optionally ``.gz``) and ``.parquet``;
    ``split`` is ignored for them. Anything else goes to ``datasets.load_dataset(source, split=split, **hub_kwargs)``.
    A row that cannot be decoded is yielded as a :class:`DataFormatError` so that the caller can skip it; a JSON array
    that is broken is raised at once (nothing after it can be trusted).
    """
    path = Path(source)
    label = source_label(source, split)
    if path.is_file():
        fmt = _format_of(path)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist()):
                yield i + 1, row
            return
        # Only "\n" ends a JSON line: str.splitlines() would also split at U+2028 inside strings and shift lines.
        with _open_text(path, newline="" if fmt == "csv" else "\n") as handle:
            if fmt == "csv":
                yield from _csv_rows(handle, label)
            elif fmt == "jsonl":
                yield from _json_lines(handle, label)
            else:
                text = handle.read()
                rows = _json_array_rows(text, label) if text.lstrip().startswith("[") else _json_lines(text, label)
                yield from rows
        return
    if not path.exists() and path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json", ".csv", ".parquet")):
        raise FileNotFoundError(f"{source}: no such file.")
    import datasets

    dataset = datasets.load_dataset(str(source), split=split, **dict(hub_kwargs or {}))
    for i, row in enumerate(dataset):
        yield i + 1, dict(row)


def _row_or_error(value: Any, label: str, line: int) -> dict[str, Any] | DataFormatError:
    if isinstance(value, dict):
        return value
    return DataFormatError(label, line, ROW, f"expected a JSON object, got {type(value).__name__}")


def _json_lines(lines: Iterable[str] | str, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    if isinstance(lines, str):
        lines = lines.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DataFormatError(label, number, ROW, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        yield number, _row_or_error(value, label, number)


def _json_array_rows(text: str, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        pos = skip_space(pos)
        line += text.count("\n", counted, pos)
        counted = pos
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                label, err.lineno, ROW, f"invalid JSON array ({err.msg} at column {err.colno})"
            ) from None
        yield line, _row_or_error(value, label, line)
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise DataFormatError(label, line + text.count("\n", counted, pos), ROW, "expected ',' or ']' after a row")


def _csv_rows(handle: io.TextIOBase, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    reader = csv.DictReader(handle)
    start = reader.line_num + 2  # the header occupies line 1 and DictReader reads it lazily
    for row in reader:
        if None in row:
            yield start, DataFormatError(label, start, ROW, "more cells than header columns")
        else:
            yield start, row
        start = reader.line_num + 1


# ---------------------------------------------------------------------------------------------------------------------
# Field validation


def _text(row: Mapping[str, Any], field: str, file: str, line: int) -> str:
    if field not in row or row[field] is None:
        raise DataFormatError(file, line, field, "missing")
    value = row[field]
    if not isinstance(value, str):
        raise DataFormatError(file, line, field, f"expected text, got {type(value).__name__}")
    return value


def _margin(row: Mapping[str, Any], file: str, line: int) -> float:
    value = row.get("margin")
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    if isinstance(value, bool):
        raise DataFormatError(file, line, "margin", f"expected a number, got {value!r}")
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise DataFormatError(file, line, "margin", f"expected a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise DataFormatError(file, line, "margin", f"must be finite, got {value!r}")
    return margin


def parse_messages(value: Any, field: str, file: str, line: int) -> list[Message]:
    """A list of ``{role, content}`` messages; a single message dict is accepted as a list of one."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise DataFormatError(file, line, field, "expected a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataFormatError(
                file, line, f"{field}[{i}]", f"expected a message object, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataFormatError(file, line, f"{field}[{i}].{key}", "missing or not text")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _is_messages(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str))


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """True when ``tokenizer`` carries a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_messages(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase | None, add_generation_prompt: bool = False
) -> str:
    """Render a conversation with the tokenizer's chat template, or as ``"role: content"`` lines without one.

    The plain rendering writes ``"{role}: {content}\\n"`` per message and ``"assistant: "`` as the generation prompt,
    so that a prompt rendering is always a prefix of the rendering with the reply added.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def render_reply(
    prompt: Sequence[Message],
    reply: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase | None,
    file: str = "<input>",
    line: int = 0,
    field: str = "response",
) -> tuple[str, str]:
    """Render ``prompt`` with the generation prompt, and ``reply`` as the text the template adds after it.

    The reply text includes the end-of-turn marker as the template writes it (``"...<|im_end|>\\n"`` for ChatML).

    Raises:
        DataFormatError: ``reply`` does not start with an assistant message, or the template does not render the
            prompt as a prefix of the whole conversation (so the reply cannot be cut out).
    """
    if reply[0]["role"] != "assistant":
        raise DataFormatError(
            file, line, f"{field}[0].role", f"the reply must start with an assistant message, got {reply[0]['role']!r}"
        )
    try:
        head = render_messages(prompt, tokenizer, add_generation_prompt=True)
        full = render_messages([*prompt, *reply], tokenizer)
    except Exception as err:  # jinja errors raised by a template are worth reporting with the row
        raise DataFormatError(file, line, field, f"the chat template failed: {err}") from err
    if not full.startswith(head):
        raise DataFormatError(
            file,
            line,
            field,
            "the chat template does not render the prompt as a prefix of the conversation, so the "
            "reply cannot be separated; use prompt/chosen/rejected plain text instead",
        )
    return head, full[len(head) :]


def split_transcript(text: str, file: str = "<input>", line: int = 0, field: str = "chosen") -> tuple[str, str]:
    """Split an hh-rlhf transcript at its last ``"\\n\\nAssistant:"``: ``(prompt ending with the marker, response)``.

    Raises:
        DataFormatError: the transcript has no assistant turn.
    """
    cut = text.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataFormatError(file, line, field, "transcript has no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT_MARKER)
    return text[:cut], text[cut:]


def split_transcript_pair(
    chosen: str, rejected: str, file: str = "<input>", line: int = 0
) -> tuple[str, str, str, bool]:
    """Cut two hh-rlhf transcripts into ``(shared prompt, chosen response, rejected response, realigned)``.

    The prompt is the chosen transcript up to and including its last ``"\\n\\nAssistant:"``. When the rejected
    transcript does not start with it, the chosen response itself contains further turns (hh-rlhf has such rows:
    4 of the 1,156 harmless-base test rows); the prompt is then the longest common prefix of both transcripts, cut back
    to its last ``"\\n\\nAssistant:"``, and ``realigned`` is True. Both responses keep their leading space, so
    ``prompt + response`` is the original transcript.

    Raises:
        DataFormatError: either transcript has no assistant turn, or they share no prefix ending in one.
    """
    prompt, chosen_response = split_transcript(chosen, file, line, "chosen")
    split_transcript(rejected, file, line, "rejected")
    if rejected.startswith(prompt):
        return prompt, chosen_response, rejected[len(prompt) :], False
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT_MARKER, 0, common)
    if cut < 0:
        _, rejected_response = split_transcript(rejected, file, line, "rejected")
        raise DataFormatError(
            file,
            line,
            "rejected",
            "chosen and rejected transcripts have different prompts (they share no "
            f"dialogue up to an '\\n\\nAssistant:' turn); chosen prompt ends {prompt[-60:]!r}, rejected prompt ends "
            f"{rejected[: len(rejected) - len(rejected_response)][-60:]!r}",
        )
    cut += len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:], True


def _split_conversations(
    chosen: list[Message], rejected: list[Message], file: str, line: int
) -> tuple[list[Message], list[Message], list[Message], bool]:
    """Message-list counterpart of :func:`split_transcript_pair`: the shared prompt ends before an assistant turn."""
    last = max((i for i, m in enumerate(chosen) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise DataFormatError(file, line, "chosen", "conversation has no assistant message")
    if not any(m["role"] == "assistant" for m in rejected):
        raise DataFormatError(file, line, "rejected", "conversation has no assistant message")

    def starts_reply(i: int) -> bool:
        return i < len(rejected) and chosen[i]["role"] == rejected[i]["role"] == "assistant"

    if rejected[:last] == chosen[:last] and starts_reply(last):
        return chosen[:last], chosen[last:], rejected[last:], False
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    for cut in range(common, -1, -1):
        if starts_reply(cut):
            return chosen[:cut], chosen[cut:], rejected[cut:], True
    raise DataFormatError(
        file,
        line,
        "rejected",
        "chosen and rejected conversations have different prompts (no shared messages "
        "followed by an assistant reply in both)",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Row parsers


def parse_preference_row(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    file: str = "<input>",
    line: int = 0,
    counts: Counter | None = None,
) -> PreferenceExample:
    """Parse one preference row, detecting its format from the fields present.

    - hh-rlhf transcripts: ``chosen`` / ``rejected`` text without ``prompt`` (see :func:`split_transcript_pair`);
    - plain: ``prompt`` / ``chosen`` / ``rejected`` text;
    - conversational: ``prompt`` a message list and ``chosen`` / ``rejected`` message lists (or a single message, or
      plain text taken as the assistant reply), or ``chosen`` / ``rejected`` full conversations without ``prompt``;
      rendered with :func:`render_reply`.

    An optional ``margin`` number is read in every format. Empty texts are valid (hh-rlhf prefers an empty reply to a
    harmful one in places); missing or non-text fields are not.

    Args:
        row: The decoded row.
        tokenizer: Supplies the chat template for conversational rows; None renders them as ``"role: content"``.
        file: Source name for errors.
        line: Line (or row number) for errors.
        counts: If given, ``counts["realigned"]`` is incremented for transcripts whose prompt had to be re-cut.

    Raises:
        DataFormatError: naming the file, line and field at fault.
    """
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise DataFormatError(file, line, field, "missing")
    margin = _margin(row, file, line)
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    realigned = False
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected, realigned = split_transcript_pair(chosen, rejected, file, line)
        elif _is_messages(chosen) and _is_messages(rejected):
            prompt_messages, chosen_reply, rejected_reply, realigned = _split_conversations(
                parse_messages(chosen, "chosen", file, line),
                parse_messages(rejected, "rejected", file, line),
                file,
                line,
            )
            prompt, chosen = render_reply(prompt_messages, chosen_reply, tokenizer, file, line, "chosen")
            rejected = render_reply(prompt_messages, rejected_reply, tokenizer, file, line, "rejected")[1]
        else:
            raise DataFormatError(file, line, "rejected", "chosen and rejected must both be text or both be messages")
    elif isinstance(prompt, str):
        for field in ("chosen", "rejected"):
            if not isinstance(row[field], str):
                raise DataFormatError(
                    file, line, field, f"prompt is text, so {field} must be text too (got {type(row[field]).__name__})"
                )
    elif _is_messages(prompt):
        prompt_messages = parse_messages(prompt, "prompt", file, line)
        replies = []
        for field in ("chosen", "rejected"):
            value = row[field]
            reply = [{"role": "assistant", "content": value}] if isinstance(value, str) else None
            reply = reply or parse_messages(value, field, file, line)
            replies.append(render_reply(prompt_messages, reply, tokenizer, file, line, field))
        prompt, chosen, rejected = replies[0][0], replies[0][1], replies[1][1]
    else:
        raise DataFormatError(file, line, "prompt", f"expected text or messages, got {type(prompt).__name__}")
    if realigned and counts is not None:
        counts["realigned"] += 1
    return PreferenceExample(prompt, chosen, rejected, margin)


def parse_sft_row(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    file: str = "<input>",
    line: int = 0,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> SFTExample:
    """Parse one SFT row, detecting its format from the fields present.

    - ``prompt`` / ``completion`` text (or ``prompt`` / ``chosen`` preference rows): with ``chat_template`` and a
      tokenizer that has one, rendered as a user turn and an assistant turn (after ``system_prompt`` if given);
      otherwise the two texts as they are; ``prompt`` / ``completion`` message lists are a conversation whose
      completion messages are trained;
    - ``messages``: a conversation ending with an assistant message; every assistant turn is trained (each turn is
      the model's to produce, and the earlier ones would otherwise be wasted signal);
    - ``chosen`` hh-rlhf transcript: prompt up to the last ``"\\n\\nAssistant:"``, completion the rest; a ``chosen``
      message list trains its final assistant turn.

    Raises:
        DataFormatError: naming the file, line and field at fault.
    """
    templated = has_chat_template(tokenizer)
    if "messages" in row and row["messages"] is not None:
        return _conversation_example(
            parse_messages(row["messages"], "messages", file, line), 0, tokenizer, file, line, "messages"
        )
    if "prompt" in row or "completion" in row:
        # Preference data (prompt/chosen/rejected) trains on its chosen reply.
        reply_field = "chosen" if "completion" not in row and "chosen" in row else "completion"
        prompt, completion = row.get("prompt"), row.get(reply_field)
        if _is_messages(prompt):
            context = parse_messages(prompt, "prompt", file, line)
            if isinstance(completion, str):
                reply = [{"role": "assistant", "content": completion}]
            else:
                reply = parse_messages(completion, reply_field, file, line)
            return _conversation_example([*context, *reply], len(context), tokenizer, file, line, reply_field)
        prompt, completion = _text(row, "prompt", file, line), _text(row, reply_field, file, line)
        if chat_template and templated:
            context = [{"role": "system", "content": system_prompt}] if system_prompt else []
            context.append({"role": "user", "content": prompt})
            messages = [*context, {"role": "assistant", "content": completion}]
            return _conversation_example(messages, len(context), tokenizer, file, line, reply_field)
        return SFTExample(((prompt, False), (completion, True)))
    if "chosen" in row and row["chosen"] is not None:
        chosen = row["chosen"]
        if isinstance(chosen, str):
            prompt, completion = split_transcript(chosen, file, line, "chosen")
            return SFTExample(((prompt, False), (completion, True)))
        messages = parse_messages(chosen, "chosen", file, line)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        return _conversation_example(messages, last, tokenizer, file, line, "chosen")
    raise DataFormatError(
        file,
        line,
        ROW,
        f"unknown SFT format with fields {sorted(row)}; expected prompt/completion, "
        "messages, or an hh-rlhf chosen transcript",
    )


def _conversation_example(
    messages: list[Message],
    train_from: int,
    tokenizer: PreTrainedTokenizerBase | None,
    file: str,
    line: int,
    field: str,
) -> SFTExample:
    """Cut a rendered conversation into pieces; assistant turns at index >= ``train_from`` are trained."""
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            file, line, f"{field}", f"the conversation must end with an assistant message, got {messages[-1]['role']!r}"
        )
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i in range(train_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        head, reply = render_reply(messages[:i], messages[i : i + 1], tokenizer, file, line, field)
        if not head.startswith(rendered):
            raise DataFormatError(
                file,
                line,
                field,
                "the chat template renders earlier turns differently as the "
                "conversation grows, so assistant turns cannot be located",
            )
        segments += [(head[len(rendered) :], False), (reply, True)]
        rendered = head + reply
    return SFTExample(tuple(segments), templated=has_chat_template(tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# Loading many rows


def load_examples(
    source: str | Path,
    parse: Callable[[Mapping[str, Any], str, int, Counter], T | None],
    split: str = "train",
    skip_invalid: bool = False,
    hub_kwargs: Mapping[str, Any] | None = None,
    what: str = "rows",
) -> tuple[list[T], dict[str, int]]:
    """Parse every row of ``source`` with ``parse(row, file, line, counts)``; a None result drops the row (the parser
    counts why in ``counts``).

    Returns:
        The examples and counts: ``rows`` read, ``kept``, ``invalid`` (skipped bad rows) plus the parser's own keys.

    Raises:
        DataFormatError: on the first bad row unless ``skip_invalid``.
    """
    label = source_label(source, split)
    counts: Counter = Counter(rows=0, kept=0, invalid=0)
    examples: list[T] = []
    first_errors: list[str] = []
    for line, row in iter_rows(source, split, hub_kwargs):
        counts["rows"] += 1
        try:
            if isinstance(row, DataFormatError):
                raise row
            example = parse(row, label, line, counts)
        except DataFormatError as err:
            if not skip_invalid:
                raise
            counts["invalid"] += 1
            if len(first_errors) < 3:
                first_errors.append(str(err))
            continue
        if example is not None:
            examples.append(example)
    counts["kept"] = len(examples)
    stats = dict(counts)
    summary = ", ".join(f"{key} {value}" for key, value in stats.items())
    log.info("%s: %s %s", label, what, summary)
    dropped = counts["rows"] - counts["kept"]
    if dropped:
        detail = "; first errors: " + " | ".join(first_errors) if first_errors else ""
        log.warning("%s: dropped %d of %d rows (%s)%s", label, dropped, counts["rows"], summary, detail)
    if not examples:
        raise ValueError(f"{label}: no usable rows ({summary}).")
    return examples, stats


def split_off(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministically carve ``fraction`` of ``items`` (at least one) off as a validation set: ``(train, val)``.

    Both keep the original order; the same ``seed`` and items give the same split on every run and rank.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}.")
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        raise ValueError(f"val_fraction={fraction} leaves no training rows out of {len(items)}; lower it.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val = set(order[:count])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


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
    if hasattr(type(tokenizer), "build_inputs_with_special_tokens"):
        specials = tokenizer.num_special_tokens_to_add(pair=True)
    else:
        specials = sum(len(part) for part in special_token_template(tokenizer, pair=True))
    budget = max_length - specials
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for text after the special tokens; raise it.")
    response_ids = tokenize(tokenizer, response)[:budget]
    prompt_ids = tokenize(tokenizer, prompt)
    keep = budget - len(response_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - keep) :] if keep > 0 else []
    return build_with_special_tokens(tokenizer, prompt_ids, response_ids)


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
