"""POST /v1/chat/completions (and /s/{scope}/v1/chat/completions)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
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
from proxy.upstreams.registry import Upstream
from proxy.upstreams.sse import ReplyAccumulator, loads_lenient

log = logging.getLogger("mnemoproxy.chat")


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
            route = state.router.pick(body.get("model"))
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
        if plan.body is not None:
            outgoing = json.dumps(plan.body, ensure_ascii=False).encode()
        elif route.model != body.get("model"):
            outgoing = json.dumps({**body, "model": route.model}, ensure_ascii=False).encode()
        else:
            outgoing = raw  # untouched: unknown fields pass through byte for byte
        # The user's request holds its upstream: background jobs there wait or give way.
        with state.gate.user(route.upstream.name):
            try:
                response = await run_until_disconnect(
                    receive,
                    state.pool.send(
                        route.upstream,
                        "POST",
                        "chat/completions",
                        headers=upstream_headers(route.upstream, headers),
                        content=outgoing,
                    ),
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
                await self._answer(send, receive, response, route.upstream, body, plan)
            finally:
                await response.aclose()

    async def _answer(
        self,
        send: Send,
        receive: Receive,
        response: UpstreamResponse,
        upstream: Upstream,
        body: dict[str, Any],
        plan: ChatPlan,
    ) -> None:
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


def _content_free(headers: dict[str, str]) -> dict[str, str]:
    """Drop content-type/length: send_bytes sets them from the actual body."""
    return {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
