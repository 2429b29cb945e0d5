"""Relaying an upstream response to the client as it arrives.

The relay never buffers: each SSE event is sent the moment it is complete. While it
runs, a watcher listens for the client going away; when it does, the relay is cancelled
at once so that the caller's `finally` closes the upstream request (the upstream sees
the connection close, and a local server stops generating).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.types import Receive, Send

from proxy.errors import ProxyError, UpstreamError, error_envelope, sse_error_event
from proxy.routes.http import ClientGone, encode_headers, send_bytes
from proxy.upstreams.client import UpstreamResponse
from proxy.upstreams.registry import Upstream
from proxy.upstreams.sse import DONE, Event, EventSplitter, InvalidSSE, without_usage

T = TypeVar("T")

log = logging.getLogger("mnemoproxy.relay")

# Upstream response headers that describe the upstream connection, not the content.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "date",
        "server",
        "set-cookie",
    }
)


@dataclass
class RelayResult:
    """How a relay ended."""

    completed: bool = False  # the upstream finished its response normally
    client_gone: bool = False  # the client disconnected first
    error: ProxyError | None = None  # the upstream failed mid-stream


def response_headers(upstream: UpstreamResponse, extra: Mapping[str, str]) -> dict[str, str]:
    """The upstream's content headers plus ours (X-Memory-*), names in lower case (so
    that ours replace the upstream's, whatever its case: one Content-Type, not two)."""
    headers = {k.lower(): v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
    headers.update(extra)
    return headers


def is_event_stream(response: UpstreamResponse, asked: bool) -> bool:
    """Whether the upstream answered with server-sent events: as its Content-Type says
    (whatever was asked for), else as the request asked (`stream`)."""
    kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "text/event-stream":
        return True
    if kind == "application/json":
        return False
    return asked  # no type, or an odd one: a server that mislabels its stream


async def relay_sse(
    send: Send,
    receive: Receive,
    response: UpstreamResponse,
    upstream: Upstream,
    *,
    headers: Mapping[str, str],
    on_chunk: Callable[[Any], None] | None = None,
    before_done: Callable[[], Awaitable[None]] | None = None,
    strip_usage: bool = False,
) -> RelayResult:
    """Relay an SSE chat stream event by event; the caller closes `response`.

    The complete events of each upstream read go to the client at once, in one send.
    `on_chunk` gets each event's parsed JSON data (should it raise, the event goes on
    all the same); without it nothing is parsed (the lines are still checked). Invalid
    SSE or a broken upstream becomes one `data: {"error": ...}` event and `[DONE]`,
    after the good events before it; the upstream's own `[DONE]` is replaced by ours,
    sent once at the end. `before_done` runs after the upstream's last event
    and before `[DONE]` reaches the client (the memory write, so a client that saw
    `[DONE]` knows its turn is stored). `strip_usage` keeps from the client the usage
    that the proxy asked for and it did not (`on_chunk` still sees it).
    """
    out = response_headers(response, headers)
    out["content-type"] = "text/event-stream; charset=utf-8"
    out.setdefault("cache-control", "no-cache")
    out["x-accel-buffering"] = "no"
    result = RelayResult()

    async def pump() -> None:
        await send({"type": "http.response.start", "status": 200, "headers": encode_headers(out)})
        splitter = EventSplitter()
        parse = on_chunk is not None or strip_usage
        try:
            async for chunk in response.aiter_bytes():
                if not parse:
                    data = splitter.feed_bytes(chunk)
                else:
                    data = _handled(splitter.feed(chunk), on_chunk, strip_usage)
                if data:
                    await _body(send, data)
            data = _handled(splitter.finish(parse_data=parse), on_chunk, strip_usage)
            if data:
                await _body(send, data)
        except InvalidSSE as exc:
            result.error = UpstreamError(
                f"upstream {upstream.name!r} sent an invalid stream: {exc}"
            )
            data = _handled(exc.before, on_chunk, strip_usage)  # good events of the same read
            if data:
                await _body(send, data)
        except UpstreamError as exc:  # the transport failed; the response named it
            result.error = exc
        if result.error is not None:
            await _body(send, sse_error_event(result.error))
        else:
            result.completed = True
            if before_done is not None:
                await before_done()
            await _body(send, DONE)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    try:
        await run_until_disconnect(receive, pump())
    except ClientGone:
        result.client_gone = True
    return result


def _handled(
    events: list[Event], on_chunk: Callable[[Any], None] | None, strip_usage: bool = False
) -> bytes:
    """The events' bytes, `[DONE]` left out (ours comes at the end), each event's data
    given to `on_chunk` first, and with `strip_usage` without their usage."""
    kept = [e for e in events if not e.done]
    if on_chunk is not None:
        for event in kept:
            if event.data is not None:
                try:
                    on_chunk(event.data)
                except Exception:  # reading for memory never costs the client its reply
                    log.exception("could not read a streamed event: %.120r", event.raw)
    if strip_usage:
        return b"".join(_stripped(e) for e in kept)
    return b"".join(e.raw for e in kept)


def _stripped(event: Event) -> bytes:
    """The event's bytes without the usage the client did not ask for (b"": left out)."""
    try:
        stripped = without_usage(event)
    except Exception:  # an event we cannot rewrite goes on as it came, usage and all
        log.exception("could not take the usage out of a streamed event: %.120r", event.raw)
        return event.raw
    return b"" if stripped is None else stripped.raw


async def relay_bytes(
    send: Send, receive: Receive, response: UpstreamResponse, *, headers: Mapping[str, str]
) -> RelayResult:
    """Relay any response body unchanged, chunk by chunk; the caller closes `response`."""
    out = response_headers(response, headers)
    result = RelayResult()

    async def pump() -> None:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": encode_headers(out),
            }
        )
        try:
            async for chunk in response.aiter_bytes():
                await _body(send, chunk)
        except UpstreamError as exc:
            # Headers are gone already; all we can do is end the body early.
            result.error = exc
        else:
            result.completed = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    try:
        await run_until_disconnect(receive, pump())
    except ClientGone:
        result.client_gone = True
    return result


async def _body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first: then cancel it, raise ClientGone.

    The work is cancelled at once, wherever it is waiting (on a slow upstream, or for
    an upstream's response headers), not when the next send to the client would fail.
    A send that fails because the client is gone also raises ClientGone.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task in done:
            try:
                return work_task.result()
            except OSError as exc:  # the server could not write to the client
                raise ClientGone() from exc
        work_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await work_task
        raise ClientGone()
    finally:
        watch_task.cancel()
        work_task.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def pass_error(
    send: Send,
    receive: Receive,
    response: UpstreamResponse,
    upstream: Upstream,
    extra: dict[str, str],
) -> None:
    """Pass an upstream error status through with its body (wrapped in OpenAI's envelope
    if it is not one), with the upstream's own key blanked out should the body quote it,
    and with the upstream's headers (`Retry-After` and `x-ratelimit-*` tell a client
    how long to back off)."""
    try:
        content = await run_until_disconnect(receive, response.aread())
    except ClientGone:
        return
    except UpstreamError as exc:  # the body broke off: say so instead
        await send_bytes(send, exc.status, json.dumps(exc.envelope()).encode(), headers=extra)
        return
    if upstream.api_key:
        content = content.replace(upstream.api_key.encode(), b"***")
    try:
        parsed = json.loads(content)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict) or "error" not in parsed:
        text = content.decode("utf-8", "replace").strip()[:500]
        message = f"upstream {upstream.name!r} answered {response.status_code}: {text}"
        content = json.dumps(error_envelope(message, "upstream_error")).encode()
    headers = response_headers(response, extra)
    headers.pop("content-type", None)  # the body sent is JSON, rewrapped or not
    await send_bytes(send, response.status_code, content, headers=headers)
