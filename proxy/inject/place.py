"""Where the memory block goes in the prompt.

Close to the end by default: models use context near the question best, and
everything before the block stays byte-identical from turn to turn, so a local
server's prompt cache keeps reusing that prefix.
"""

from __future__ import annotations

from typing import Any

from proxy.messages import is_conversation

_SYSTEM_ROLES = ("system", "developer")


def place_block(
    messages: list[dict[str, Any]],
    block_text: str,
    *,
    depth: int = 1,
    role: str = "system",
    merge_into_system: bool = False,
) -> list[dict[str, Any]]:
    """A new message list with the block inserted; the input is never mutated.

    The block becomes one message (`role`) placed `depth` conversation messages from
    the end: depth 1 puts it just before the last message (normally the user's last
    message), depth 0 at the very end; a depth beyond the conversation puts it right
    after the leading system messages. The block never lands between an assistant's
    tool call and its results: it moves up to before the call.

    `merge_into_system=True` instead appends the block to the first system (or
    developer) message, or adds a system message at the start when there is none.
    Many local models' chat templates (Gemma, Mistral and others) reject a system
    message anywhere but first, or more than one; merging keeps such upstreams
    working at the cost of changing the prompt's first message every turn (no prefix
    reuse by the server's cache).

    An empty block returns a copy of the input list with the same messages.
    """
    if not block_text:
        return list(messages)
    if merge_into_system:
        return _merge(messages, block_text)
    index = _insert_index(messages, max(0, depth))
    block = {"role": role, "content": block_text}
    return [*messages[:index], block, *messages[index:]]


def _insert_index(messages: list[dict[str, Any]], depth: int) -> int:
    if depth == 0:
        return len(messages)
    conversation = [i for i, m in enumerate(messages) if is_conversation(m)]
    if depth > len(conversation):
        return _leading_system_end(messages)
    index = conversation[-depth]
    # Step back over tool results (and whatever sits between them) to their call.
    while index > 0 and messages[index].get("role") in ("tool", "function"):
        index -= 1
        while index > 0 and not is_conversation(messages[index]):
            index -= 1
    return index


def _leading_system_end(messages: list[dict[str, Any]]) -> int:
    for i, message in enumerate(messages):
        if is_conversation(message):
            return i
    return len(messages)


def _merge(messages: list[dict[str, Any]], block_text: str) -> list[dict[str, Any]]:
    for i, message in enumerate(messages):
        if message.get("role") in _SYSTEM_ROLES:
            merged = {**message, "content": _append(message.get("content"), block_text)}
            return [*messages[:i], merged, *messages[i + 1 :]]
    return [{"role": "system", "content": block_text}, *messages]


def _append(content: Any, block_text: str) -> Any:
    if isinstance(content, list):
        return [*content, {"type": "text", "text": block_text}]
    if isinstance(content, str) and content:
        return f"{content}\n\n{block_text}"
    return block_text
