"""Chat rendering: a conversation as text, with the tokenizer's chat template or as plain ``role: content`` lines."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.errors import DataFormatError

Message = dict[str, str]
"""One ``{"role", "content"}`` message of a conversation."""


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
