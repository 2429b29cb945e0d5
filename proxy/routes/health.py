"""/healthz (the process is up), /readyz (the upstreams answer), /metrics."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from proxy.errors import ProxyError
from proxy.routes.state import AppState
from proxy.upstreams.discovery import list_models

READY_TIMEOUT = 3.0


async def healthz(request: Request) -> JSONResponse:
    """Always 200 while the process serves requests."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 when every upstream answers `/v1/models`, else 503 naming the ones that don't."""
    state: AppState = request.app.state.proxy
    upstreams = list(state.router.upstreams.values())

    async def check(upstream) -> str | None:
        try:
            await list_models(state.pool, upstream, timeout=READY_TIMEOUT)
        except ProxyError as exc:
            return exc.message
        return None

    results = await asyncio.gather(*(check(u) for u in upstreams))
    ready = bool(upstreams) and all(err is None for err in results)
    if state.auth.enabled:
        try:
            state.auth.identify({k.lower(): v for k, v in request.headers.items()})
        except ProxyError:  # without a key: the verdict only, no upstream details
            return JSONResponse(
                {"status": "ready" if ready else "unavailable"}, status_code=200 if ready else 503
            )
    report = {
        u.name: {"ok": err is None, "error": err} for u, err in zip(upstreams, results, strict=True)
    }
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "upstreams": report},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format."""
    state: AppState = request.app.state.proxy
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")
