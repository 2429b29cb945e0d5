"""Plain helpers over OpenAI chat messages (dicts), shared by every layer."""

from __future__ import annotations

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


def is_conversation(message: dict[str, Any]) -> bool:
    """Whether a message is part of the conversation (not a system/developer prompt)."""
    return message.get("role") in CONVERSATION_ROLES
