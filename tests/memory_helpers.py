"""Helpers for memory tests: SillyTavern-shaped chats and a look inside the store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from proxy.memory import records
from proxy.memory.store import Store

MAIN_PROMPT = "Write Mira's next reply in a fictional chat between Mira and Tom."
GREETING = "*Mira looks up from the map spread across the tavern table.* Well met, traveler."


def st_messages(history: list[tuple[str, str]], *, world_info: str = "") -> list[dict[str, Any]]:
    """A request body's messages exactly as SillyTavern lays them out (see clients.md)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": MAIN_PROMPT},
        {"role": "system", "content": f"[World info: {world_info or 'the Riverlands'}]"},
        {"role": "system", "content": "[Mira is a cartographer with a dry wit.]"},
        {"role": "system", "content": "[Start a new Chat]"},
        {"role": "assistant", "content": GREETING},
    ]
    messages += [{"role": role, "content": text} for role, text in history]
    return messages


def st_body(history: list[tuple[str, str]], **fields: Any) -> dict[str, Any]:
    """A whole SillyTavern request body."""
    body: dict[str, Any] = {
        "messages": st_messages(history, world_info=fields.pop("world_info", "")),
        "model": "fake-model",
        "temperature": 1,
        "max_tokens": 256,
        "stream": False,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_p": 1,
        "logit_bias": {},
    }
    body.update(fields)
    return body


def filler(i: int) -> str:
    """A user turn about nothing in particular (shares no rare words with the facts)."""
    return f"Turn {i}. We walk on along the road while the weather stays grey and mild."


def memory_block(messages: list[dict[str, Any]]) -> str | None:
    """The memory block the proxy injected, if any."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and content.startswith("[Memory:"):
            return content
    return None


def open_store(path: Path) -> Store:
    """The proxy's own database, opened the way the CLI does (for inspection)."""
    return Store.open_sync(path)


def transcript_of(db: Path, name: str, owner: str = "") -> list[records.MessageRow]:
    """Every stored message of a scope, undone ones included, in order."""
    store = open_store(db)
    try:
        scope = store.read_sync(records.get_scope, owner, name)
        assert scope is not None, f"no scope {name!r}"
        return store.read_sync(records.get_messages, scope.id, include_undone=True)
    finally:
        store.close_sync()


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")
