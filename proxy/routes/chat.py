"""POST /v1/chat/completions (and /s/{scope}/v1/chat/completions)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from proxy.errors import ProxyError, UpstreamError
from proxy.routes.http import (
    ClientGone,
    parse_json_object,
    read_body,
    request_headers,
    send_bytes,
    send_error,
)
from proxy.routes.models import route_for
from proxy.routes.plan import ChatPlan, UnchangedPlan
from proxy.routes.relay import (
    is_event_stream,
    pass_error,
    relay_sse,
    response_headers,
    run_until_disconnect,
)
from proxy.routes.state import AppState
from proxy.routes.validation import validate_chat_body
from proxy.upstreams.client import UpstreamResponse, upstream_headers
from proxy.upstreams.registry import Route, Upstream
from proxy.upstreams.sse import ReplyAccumulator, loads_lenient

log = logging.getLogger("mnemoproxy.chat")

# What older servers answer to a field they do not know (`stream_options`).
_REFUSED = frozenset({400, 422})


class ChatCompletions:
    """The chat endpoint, as a raw ASGI app so that it owns its stream end to end."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState = scope["app"].state.proxy
        started = time.perf_counter()
        headers = request_headers(scope)
        try:
            identity = state.auth.identify(headers)
            raw = await read_body(scope, receive, state.max_body_bytes)
            body = parse_json_object(raw)
            validate_chat_body(body)
            route = await route_for(state, body.get("model"), headers)
            plan = await state.memory.prepare(
                identity=identity,
                path_scope=scope.get("path_params", {}).get("scope"),
                headers=headers,
                body=body,
                route=route,
            )
        except ClientGone:
            return
        except ProxyError as exc:
            state.metrics.count_error(exc)
            await send_error(send, exc)
            return
        sending = plan.body
        if sending is None and route.model != body.get("model"):
            sending = {**body, "model": route.model}

        def plain() -> bytes:  # untouched, the request goes on as it came, byte for byte
            return raw if sending is None else json.dumps(sending, ensure_ascii=False).encode()

        # A stream reports usage only when asked; calibrating the budget needs it.
        asking = None
        if plan.wants_usage and state.pool.takes_stream_options(route.upstream):
            asking = _asking_usage(body if sending is None else sending)
        fallback = None if asking is None else plain
        outgoing = plain() if asking is None else json.dumps(asking, ensure_ascii=False).encode()
        # The user's request holds its upstream: background jobs there wait or give way.
        with state.gate.user(route.upstream.name):
            try:
                response, added = await run_until_disconnect(
                    receive, self._send(state, route, headers, outgoing, fallback)
                )
            except ClientGone:
                return
            except ProxyError as exc:
                state.metrics.count_error(exc)
                await send_error(send, exc, plan.headers)
                return
            state.metrics.upstream_started(route.upstream.name, time.perf_counter() - started)
            if response.status_code < 400:  # the key works: background work may use it
                state.pool.lend_key(route.upstream, headers)
            try:
                await self._answer(send, receive, response, route.upstream, body, plan, added)
            finally:
                await response.aclose()

    async def _send(
        self,
        state: AppState,
        route: Route,
        headers: dict[str, str],
        outgoing: bytes,
        fallback: Callable[[], bytes] | None,
    ) -> tuple[UpstreamResponse, bool]:
        """Send the request upstream; the caller closes the response it returns.

        `fallback` makes the request without the `stream_options` we added to `outgoing`:
        an upstream that refuses those (400/422) gets it at once, and the client sees
        only that answer. Returns the response, and whether it is to our stream_options.
        """
        upstream = route.upstream
        forwarded = upstream_headers(upstream, headers)
        response = await state.pool.send(
            upstream, "POST", "chat/completions", headers=forwarded, content=outgoing
        )
        if fallback is None or response.status_code not in _REFUSED:
            return response, fallback is not None
        # Refused for our field only if the answer names it (a server that does not know
        # a field says which); any other 400 (a model still loading) is the client's.
        if b"stream_options" not in await response.aread():
            return response, True
        status = response.status_code
        await response.aclose()
        response = await state.pool.send(
            upstream, "POST", "chat/completions", headers=forwarded, content=fallback()
        )
        if response.status_code < 400 and state.pool.refuse_stream_options(upstream):
            log.info(
                "upstream %r answered %d to stream_options; not sending it there again "
                "(the token budget is calibrated from non-streamed replies only)",
                upstream.name,
                status,
            )
        return response, False

    async def _answer(
        self,
        send: Send,
        receive: Receive,
        response: UpstreamResponse,
        upstream: Upstream,
        body: dict[str, Any],
        plan: ChatPlan,
        strip_usage: bool = False,
    ) -> None:
        """Pass the upstream's answer on; `strip_usage`: leave out the usage that we,
        not the client, asked a stream for."""
        if response.status_code >= 400:
            await pass_error(send, receive, response, upstream, plan.headers)
        elif is_event_stream(response, body.get("stream") is True):  # what came
            if isinstance(plan, UnchangedPlan):  # records nothing: no chunk is parsed
                await relay_sse(send, receive, response, upstream, headers=plan.headers)
                return
            reply = ReplyAccumulator()
            recorded = False

            async def record_whole() -> None:
                nonlocal recorded
                recorded = True
                await plan.record(reply, partial=reply.failed)  # an error event cut it short

            try:
                result = await relay_sse(
                    send,
                    receive,
                    response,
                    upstream,
                    headers=plan.headers,
                    on_chunk=reply.add_chunk,
                    before_done=record_whole,
                    strip_usage=strip_usage,
                )
            except asyncio.CancelledError:  # the server stops mid-stream: keep what came
                if not recorded:
                    await asyncio.shield(plan.record(reply, partial=True))
                raise
            if result.client_gone or result.error is not None:
                await plan.record(reply, partial=True)
        else:
            await self._complete(send, receive, response, upstream, plan)

    async def _complete(
        self,
        send: Send,
        receive: Receive,
        response: UpstreamResponse,
        upstream: Upstream,
        plan: ChatPlan,
    ) -> None:
        """A reply that is not an event stream: read it whole, record what memory can
        read of it, then pass it on as it came (status, content type, bytes)."""
        try:
            content = await run_until_disconnect(receive, response.aread())
        except ClientGone:
            return
        except UpstreamError as exc:  # the body broke off or stalled
            await send_error(send, exc, plan.headers)
            return
        try:
            parsed = loads_lenient(content)
        except (ValueError, RecursionError):  # not JSON: passed on, memory gets no reply
            parsed = None
        reply = ReplyAccumulator()
        try:
            reply.add_completion(parsed)
        except Exception:  # reading for memory never costs the client its reply
            log.exception("could not read the reply of upstream %r", upstream.name)
        await plan.record(reply, partial=False)
        await send_bytes(
            send,
            response.status_code,
            content,
            content_type=response.headers.get("content-type") or None,  # as it came
            headers=_content_free(response_headers(response, plan.headers)),
        )


def _asking_usage(body: dict[str, Any]) -> dict[str, Any] | None:
    """`body` asking its stream to report usage, keeping the client's other
    stream_options; None if it is not ours to add (not a stream, the client asked for
    usage itself, or its stream_options are not an object)."""
    if body.get("stream") is not True:
        return None
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    return {**body, "stream_options": {**options, "include_usage": True}}


def _content_free(headers: dict[str, str]) -> dict[str, str]:
    """Drop content-type/length: send_bytes sets them from the actual body."""
    return {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
