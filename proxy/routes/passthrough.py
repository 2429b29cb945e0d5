"""Every other /v1/* endpoint (completions, embeddings, audio, ...): passed through."""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

from proxy.errors import ProxyError
from proxy.routes.http import ClientGone, read_body, request_headers, send_error
from proxy.routes.models import route_for
from proxy.routes.relay import pass_error, relay_bytes, run_until_disconnect
from proxy.routes.state import AppState
from proxy.upstreams.client import upstream_headers
from proxy.upstreams.registry import Route


class PassThrough:
    """Forward the request to the upstream its `model` picks (or the default) and relay
    the answer unchanged, streaming or not."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState = scope["app"].state.proxy
        headers = request_headers(scope)
        path = scope["path_params"]["path"]
        try:
            state.auth.identify(headers)
            raw = await read_body(scope, receive, state.max_body_bytes)
            route, path, raw = await pick_route(state, path, headers, raw)
            query = scope.get("query_string", b"").decode("latin-1")
            response = await run_until_disconnect(
                receive,
                state.pool.send(
                    route.upstream,
                    scope["method"],
                    path,
                    headers=upstream_headers(route.upstream, headers),
                    content=raw or None,
                    params=query or None,
                ),
            )
        except ClientGone:
            return
        except ProxyError as exc:
            state.metrics.count_error(exc)
            await send_error(send, exc)
            return
        try:
            if response.status_code >= 400:
                await pass_error(send, receive, response, route.upstream, {})
            else:
                await relay_bytes(send, receive, response, headers={})
        finally:
            await response.aclose()


async def pick_route(
    state: AppState, path: str, headers: dict[str, str], raw: bytes
) -> tuple[Route, str, bytes]:
    """Choose the upstream from the JSON body's `model` (or `models/{id}` in the path).

    Returns the route, the path to request upstream and the body, with a routing
    prefix (`local/llama3` -> `llama3`) removed from the model name.
    """
    if path.startswith("models/") and len(path) > len("models/"):
        route = await route_for(state, path[len("models/") :], headers)
        return route, f"models/{route.model}", raw
    model = None
    data = None
    if raw and headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None  # not ours to judge: the upstream will answer it
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            model = data["model"]
    route = await route_for(state, model, headers)
    if model is not None and route.model != model and isinstance(data, dict):
        raw = json.dumps({**data, "model": route.model}, ensure_ascii=False).encode()
    return route, path, raw
