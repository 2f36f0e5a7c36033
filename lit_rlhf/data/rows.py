"""Row formats and their validation: preference and SFT examples (and the ``Prompt`` record) parsed from decoded rows,
hh-rlhf transcripts, plain text or conversations, with errors that name the file, line and field at fault."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.chat import Message, has_chat_template, render_reply
from lit_rlhf.data.errors import ROW, DataFormatError

ASSISTANT_MARKER = "\n\nAssistant:"
"""Opens an assistant turn in an hh-rlhf transcript; the prompt ends with the last one."""


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


@dataclass(frozen=True)
class Prompt:
    """A prompt as read: the raw ``text`` (what rewards see) and, for ``messages`` rows, the conversation."""

    text: str
    messages: tuple[Message, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Field validation


def _text(row: Mapping[str, Any], field: str, file: str, line: int) -> str:
    if field not in row or row[field] is None:
        raise DataFormatError(file, line, field, "missing")
    value = row[field]
    if not isinstance(value, str):
        raise DataFormatError(file, line, field, f"expected text, got {type(value).__name__}")
    return value


def number(value: Any, field: str, file: str, line: int) -> float:
    """``value`` as a finite float, or an error naming the field: booleans, empty text, other non-numbers and
    nan / inf are refused."""
    if isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise DataFormatError(file, line, field, f"expected a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise DataFormatError(file, line, field, f"expected a number, got {value!r}") from None
    if not math.isfinite(result):
        raise DataFormatError(file, line, field, f"must be finite, got {value!r}")
    return result


def _margin(row: Mapping[str, Any], file: str, line: int) -> float:
    value = row.get("margin")
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    return number(value, "margin", file, line)


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
# hh-rlhf transcripts and conversations: where the shared prompt ends


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
