"""Server-sent events from an upstream: split into events, checked, passed on as bytes.

The relay forwards whole events as soon as each one is complete, so the client sees
exactly what the upstream sent (every field, the usage chunk, llama.cpp's `timings`),
and a broken stream is caught at an event boundary instead of half-way through one.
The one exception is usage that the proxy asked for and the client did not
(`without_usage`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"


class InvalidSSE(Exception):
    """The upstream sent something that is not an OpenAI-style SSE stream.

    `before` holds the events that were complete before the fault in the same feed:
    good ones, which the relay still passes on before it reports the fault.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.before: list[Event] = []


@dataclass(frozen=True)
class Event:
    """One SSE event: its bytes as received (normalised to end with a blank line) and
    its parsed JSON data (None for comments, `[DONE]` and data-less events)."""

    raw: bytes
    data: Any = None
    done: bool = False


_FIELDS = (b"data", b"event", b"id", b"retry")

# A line (after its newline) that is neither empty, a comment, nor one of the fields
# above. Searched for in b"\n" + events: a leading literal keeps the search fast.
_BAD_LINE = re.compile(rb"\n(?!(?:data|event|id|retry)(?::|\n)|:|\n|\Z)")


class EventSplitter:
    """Incremental parser: feed bytes as they arrive, get complete events back.

    `feed` gives each event with its JSON data parsed (for whoever records the reply);
    `feed_bytes` gives only the bytes of the complete events, checked line by line but
    not parsed, which is all a relay that records nothing needs.
    """

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024):
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes; return the events completed by them (raises InvalidSSE)."""
        events: list[Event] = []
        try:
            for block in self._complete_blocks(self._take(chunk)):
                events.append(parse_event(block))
            self._check_size()
        except InvalidSSE as exc:
            exc.before = events
            raise
        return events

    def feed_bytes(self, chunk: bytes) -> bytes:
        """Add bytes; return the complete events among them as bytes, `[DONE]` left out.

        Every line is checked (raises InvalidSSE), event data is not parsed. The
        bytes are what `feed` would give as the events' `raw`, joined.
        """
        complete = self._take(chunk)
        if not complete:
            self._check_size()
            return b""
        events = complete
        if events.endswith(DONE) and (events == DONE or events.endswith(b"\n\n" + DONE)):
            events = events[: -len(DONE)]  # the usual ending, dropped without parsing
        if (
            _BAD_LINE.search(b"\n" + complete) is None
            and b"[DONE]" not in events
            and b"\n\n\n" not in events
            and not events.startswith(b"\n")
            and len(self._buffer) <= self._max
        ):
            return events  # the usual case: well-formed events, nothing (else) to drop
        kept: list[Event] = []
        try:
            for block in self._complete_blocks(complete):
                event = parse_event(block, parse_data=False)
                if not event.done:
                    kept.append(event)
            self._check_size()
        except InvalidSSE as exc:
            exc.before = kept
            raise
        return b"".join(e.raw for e in kept)

    def finish(self, *, parse_data: bool = True) -> list[Event]:
        """Events left at the end of the stream (a last event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        if not rest.strip():
            return []
        return [parse_event(rest.rstrip(b"\n"), parse_data=parse_data)]

    def _take(self, chunk: bytes) -> bytes:
        """Add `chunk`; return the buffered bytes up to the last event's end (b"" if none)
        and keep the rest (its size is for the caller to check)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            complete, self._buffer = b"", buffer
        else:
            complete, self._buffer = buffer[: end + 2], buffer[end + 2 :]
        return complete

    def _check_size(self) -> None:
        """Raise InvalidSSE if the unfinished event is over the limit (checked after the
        complete events before it are taken, so that those still go on)."""
        if len(self._buffer) > self._max:
            raise InvalidSSE(f"an SSE event exceeded {self._max} bytes without ending")

    @staticmethod
    def _complete_blocks(complete: bytes) -> list[bytes]:
        """The non-blank event blocks (without their blank line) in complete events."""
        return [block for block in complete.split(b"\n\n") if block.strip()]


def parse_event(block: bytes, *, parse_data: bool = True) -> Event:
    """Parse one event block (lines without the trailing blank line).

    With `parse_data` false the lines are checked but the JSON data is not parsed
    (`data` stays None); `[DONE]` is still recognised."""
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
    if not parse_data:
        return Event(raw)
    try:
        return Event(raw, loads_lenient(payload))
    except (ValueError, RecursionError) as exc:
        raise InvalidSSE(f"event data is not JSON: {payload[:120]!r}") from exc


def loads_lenient(data: bytes) -> Any:
    """Parse JSON bytes, reading any that are not UTF-8 as U+FFFD (memory stores the
    text so; the client still gets the bytes as they came). Raises ValueError or
    RecursionError when it is not JSON."""
    try:
        return json.loads(data)
    except UnicodeDecodeError:  # the rare case: decoded again only then
        return json.loads(data.decode("utf-8", "replace"))


def without_usage(event: Event) -> Event | None:
    """The event as a client that did not ask for usage would have got it.

    A chunk that holds nothing but usage (OpenAI's last one: no choices, only the ids)
    is left out (None); any other chunk with a `usage` key (a `null` one on every
    chunk, usage on the last chunk with choices, llama.cpp's last chunk that also
    carries its `timings`) loses that key and is written again. Every other event comes
    back as it is, its bytes untouched, and so does one whose bytes are not UTF-8
    (rewriting it would change them).
    """
    data = event.data
    if not isinstance(data, dict) or "usage" not in data:
        return event
    if not data.get("choices") and data.keys() <= _USAGE_ONLY:
        return None
    try:
        event.raw.decode("utf-8")
    except UnicodeDecodeError:
        return event
    rest = {key: value for key, value in data.items() if key != "usage"}
    # A lone surrogate (only ever inside a JSON string) is written as its \u escape.
    payload = json.dumps(rest, ensure_ascii=False, separators=(",", ":"))
    return Event(_with_payload(event.raw, payload.encode("utf-8", "backslashreplace")), rest)


# The keys of a chunk that carries usage and nothing else.
_USAGE_ONLY = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "service_tier", "choices", "usage"}
)


def _with_payload(raw: bytes, payload: bytes) -> bytes:
    """The event `raw` with its data lines replaced by one line holding `payload` (in
    the place of the first; comments and other fields kept)."""
    lines: list[bytes] = []
    for line in raw[:-2].split(b"\n"):  # raw always ends with its blank line
        if line.partition(b":")[0] != b"data":
            lines.append(line)
        elif payload:
            lines.append(b"data: " + payload)
            payload = b""
    return b"\n".join(lines) + b"\n\n"


def _first_choice(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The first choice (index 0) of a completion or chunk, if it has a readable one."""
    choices = body.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                yield choice


@dataclass
class ReplyAccumulator:
    """Builds the assistant's message from streamed chunks (first choice), for memory.

    It reads only what has the shape it expects and leaves out the rest: an upstream's
    odd chunk costs the memory that piece, never the relay.
    """

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    failed: bool = False  # the stream carried an error event: the reply is unfinished

    def add_chunk(self, chunk: Any) -> None:
        """Take one parsed `chat.completion.chunk` (or an error event)."""
        if not isinstance(chunk, dict):
            return
        if chunk.get("error") is not None:
            self.failed = True
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"] or self.model
        for choice in _first_choice(chunk):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    self.content.append(delta["content"])
                if isinstance(delta.get("tool_calls"), list):
                    for call in delta["tool_calls"]:
                        self._add_tool_call(call)
            if choice.get("finish_reason") and isinstance(choice["finish_reason"], str):
                self.finish_reason = choice["finish_reason"]

    def add_completion(self, body: Any) -> None:
        """Take a whole non-streamed `chat.completion` body."""
        if not isinstance(body, dict):
            return
        self.usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        self.model = body.get("model") if isinstance(body.get("model"), str) else None
        for choice in _first_choice(body):
            message = choice.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("content"), str):
                    self.content.append(message["content"])
                if isinstance(message.get("tool_calls"), list):
                    calls = [call for call in message["tool_calls"] if isinstance(call, dict)]
                    self.tool_calls.update(enumerate(calls))
            finish = choice.get("finish_reason")
            self.finish_reason = finish if isinstance(finish, str) else None

    def _add_tool_call(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index, fn = call.get("index", 0), call.get("function") or {}
        if not isinstance(index, int) or not isinstance(fn, dict):
            return  # unreadable: which call it continues, or what it calls
        slot = self.tool_calls.setdefault(index, {"id": None, "type": "function", "function": {}})
        if call.get("id") and isinstance(call["id"], str):
            slot["id"] = call["id"]
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
