"""Plain helpers over OpenAI chat messages (dicts), shared by every layer."""

from __future__ import annotations

import re
from typing import Any

CONVERSATION_ROLES = frozenset({"user", "assistant", "tool", "function"})


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message: its string content, or its text parts joined.

    Non-text parts (images, audio) are ignored; a message with no content (an
    assistant message that only calls tools) has the empty string as text.
    """
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
        ]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


# The reasoning a thinking model (DeepSeek-R1, QwQ, Qwen3...) writes before its answer.
_REASONING_OPEN = re.compile(
    r"\s*<(?:think|thinking|reasoning)>.*?(?:</(?:think|thinking|reasoning)>|$)",
    re.DOTALL | re.IGNORECASE,
)
_REASONING_CLOSE = re.compile(r"</(think|thinking|reasoning)>", re.IGNORECASE)


def without_reasoning(text: str) -> str:
    """An assistant's text without the reasoning block its answer starts with.

    `<think>…</think>` (or `<thinking>`, `<reasoning>`); a block never closed (a reply
    cut while thinking) is all reasoning, and so is the text before a closing tag whose
    opening tag was in the prompt (some chat templates end the prompt with `<think>`).
    Apps such as SillyTavern keep the answer alone in the chat, so a reply must be
    stored, and recognised when it comes back, without it; the tag anywhere else is
    the text's own.
    """
    opened = _REASONING_OPEN.match(text)
    if opened:
        return text[opened.end() :].lstrip()
    closed = _REASONING_CLOSE.search(text)
    if closed and f"<{closed.group(1).lower()}" not in text[: closed.start()].lower():
        return text[closed.end() :].lstrip()
    return text


def is_conversation(message: dict[str, Any]) -> bool:
    """Whether a message is part of the conversation (not a system/developer prompt)."""
    return message.get("role") in CONVERSATION_ROLES


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins the paired ones


def without_lone_surrogates(value: Any) -> Any:
    """Parsed JSON with each lone UTF-16 surrogate in its strings (JSON allows "\\ud83d"
    alone) replaced by U+FFFD: no UTF-8 text, so nothing stored, can hold one."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    return value
