"""GET /v1/models: the models of every upstream, merged."""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy.errors import ProxyError, UpstreamError
from proxy.routes.state import AppState
from proxy.upstreams.discovery import list_models

log = logging.getLogger("mnemoproxy.models")

LIST_TIMEOUT = 10.0


async def merged_models(
    state: AppState, client_headers: dict[str, str] | None = None
) -> tuple[list[dict], list[str]]:
    """Every upstream's models, each listed under an id that routes back to it, and the
    errors of the upstreams that did not answer."""
    upstreams = list(state.router.upstreams.values())
    results = await asyncio.gather(
        *(
            list_models(state.pool, u, timeout=LIST_TIMEOUT, client_headers=client_headers)
            for u in upstreams
        ),
        return_exceptions=True,
    )
    merged: dict[str, dict] = {}
    errors = []
    listed: dict[str, list[str]] = {}
    for upstream, result in zip(upstreams, results, strict=True):
        if isinstance(result, ProxyError):
            errors.append(result.message)
            continue
        if isinstance(result, BaseException):
            raise result
        listed[upstream.name] = [entry["id"] for entry in result]
    if not errors:  # an upstream that did not answer may list the same names
        state.router.learn(listed)
    for upstream, result in zip(upstreams, results, strict=True):
        if isinstance(result, BaseException):
            continue
        for entry in result:
            public = state.router.public_model_id(upstream, entry["id"])
            merged.setdefault(public, {**entry, "id": public})
    return list(merged.values()), errors


async def models(request: Request) -> JSONResponse:
    """List the merged models; 502 only when no upstream answered."""
    state: AppState = request.app.state.proxy
    headers = {k.lower(): v for k, v in request.headers.items()}
    state.auth.identify(headers)
    data, errors = await merged_models(state, headers)
    for error in errors:
        log.warning("listing models: %s", error)
    if errors and not data:
        raise UpstreamError("no upstream listed its models: " + "; ".join(errors))
    return JSONResponse({"object": "list", "data": data})
