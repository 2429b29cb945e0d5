"""Server-sent events from an upstream: split into events, checked, passed on as bytes.

The relay forwards whole events as soon as each one is complete, so the client sees
exactly what the upstream sent (every field, the usage chunk, llama.cpp's `timings`),
and a broken stream is caught at an event boundary instead of half-way through one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"


class InvalidSSE(Exception):
    """The upstream sent something that is not an OpenAI-style SSE stream."""


@dataclass(frozen=True)
class Event:
    """One SSE event: its bytes as received (normalised to end with a blank line) and
    its parsed JSON data (None for comments, `[DONE]` and data-less events)."""

    raw: bytes
    data: Any = None
    done: bool = False


_FIELDS = (b"data", b"event", b"id", b"retry")


class EventSplitter:
    """Incremental parser: feed bytes as they arrive, get complete events back."""

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024):
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes; return the events completed by them (raises InvalidSSE)."""
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            block = buffer[start:end]
            start = end + 2
            if block.strip():
                events.append(parse_event(block))
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise InvalidSSE(f"an SSE event exceeded {self._max} bytes without ending")
        return events

    def finish(self) -> list[Event]:
        """Events left at the end of the stream (a last event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        return [parse_event(rest.rstrip(b"\n"))] if rest.strip() else []


def parse_event(block: bytes) -> Event:
    """Parse one event block (lines without the trailing blank line)."""
    data_lines: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if name not in _FIELDS:
            raise InvalidSSE(f"unexpected line in the event stream: {line[:120]!r}")
        if name == b"data":
            data_lines.append(value[1:] if value.startswith(b" ") else value)
    raw = block + b"\n\n"
    if not data_lines:
        return Event(raw)
    payload = b"\n".join(data_lines)
    if payload.strip() == b"[DONE]":
        return Event(raw, done=True)
    try:
        return Event(raw, json.loads(payload))
    except ValueError as exc:
        raise InvalidSSE(f"event data is not JSON: {payload[:120]!r}") from exc


@dataclass
class ReplyAccumulator:
    """Builds the assistant's message from streamed chunks (first choice), for memory."""

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None

    def add_chunk(self, chunk: Any) -> None:
        """Take one parsed `chat.completion.chunk`."""
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        self.model = chunk.get("model") or self.model
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                self._add_tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def add_completion(self, body: Any) -> None:
        """Take a whole non-streamed `chat.completion` body."""
        if not isinstance(body, dict):
            return
        self.usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        self.model = body.get("model")
        for choice in body.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                message = choice.get("message") or {}
                if isinstance(message.get("content"), str):
                    self.content.append(message["content"])
                for i, call in enumerate(message.get("tool_calls") or ()):
                    self.tool_calls[i] = call
                self.finish_reason = choice.get("finish_reason")

    def _add_tool_call(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        slot = self.tool_calls.setdefault(
            call.get("index", 0), {"id": None, "type": "function", "function": {}}
        )
        if call.get("id"):
            slot["id"] = call["id"]
        fn = call.get("function") or {}
        for key in ("name", "arguments"):
            if isinstance(fn.get(key), str):
                slot["function"][key] = slot["function"].get(key, "") + fn[key]

    def message(self) -> dict[str, Any]:
        """The assistant message as the app will show it (and send it back next turn)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if message["content"] is None and not self.tool_calls:
            message["content"] = ""
        return message
