"""Speaker names written into message text, as SillyTavern sends group chats.

In a group chat SillyTavern writes each character's message as "Bob: text" (its
default "names in prompt" setting; "prefix message content" does it in every chat, for
the user too), while the model's reply comes without the name. Stored as they come,
every reply would come back as another message (so it would be undone and stored
again on each turn) and recalled as the character's who spoke last. So the memory
layer reads such a conversation with the names moved into `name`, and stores the
reply under the name of the character who gave it. Pure functions over messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.memory.scope import MAX_NAME, chat_members
from proxy.messages import is_conversation, without_reasoning

__all__ = ["move_name_prefixes", "named_reply"]


def move_name_prefixes(
    messages: list[dict[str, Any]], user: str | None
) -> list[dict[str, Any]] | None:
    """The messages with "Name: " moved from the text into `name`, if the app writes
    names that way; None if it does not.

    It does when every assistant message of the conversation starts with the name of
    one of the chat's members (`chat_members`, from its main prompt) and ": " (a
    message that does not, or that carries a `name` already, means names are not
    written so). The user's messages are read the same way when every one of them
    starts with `user`'s name.
    """
    speaking = [m for m in messages if is_conversation(m) and m.get("role") == "assistant"]
    if not speaking or not all(_may_be_named(m) for m in speaking):
        return None  # the usual case, told without reading the main prompt
    members = chat_members(messages)
    if not members:
        return None
    moved = {id(m): _split(m, members) for m in speaking}
    if any(found is None for found in moved.values()):
        return None
    if user:
        asking = [m for m in messages if is_conversation(m) and m.get("role") == "user"]
        split = {id(m): _split(m, [user]) for m in asking}
        if asking and all(found is not None for found in split.values()):
            moved.update(split)
    out = []
    for message in messages:
        found = moved.get(id(message))
        if found is None:
            out.append(message)
        else:
            name, text = found
            out.append({**message, "content": text, "name": name})
    return out


def named_reply(reply: dict[str, Any], char: str) -> dict[str, Any]:
    """The reply of `char` in a chat whose names are in the text: under `name`, without
    the "char: " the model may have begun its answer with (after its reasoning)."""
    content = reply.get("content")
    if not isinstance(content, str):
        return {**reply, "name": char}
    answer = without_reasoning(content)
    if answer.startswith(char + ": "):
        content = answer[len(char) + 2 :]
    return {**reply, "content": content, "name": char}


def _may_be_named(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, str) and ": " in content[: MAX_NAME + 2]


def _split(message: dict[str, Any], names: Sequence[str]) -> tuple[str, str] | None:
    """(name, text) if the message's text starts with one of `names` and ": "."""
    content = message.get("content")
    if not isinstance(content, str) or message.get("name"):
        return None
    for name in names:
        if content.startswith(name + ": "):
            return name, content[len(name) + 2 :]
    return None
