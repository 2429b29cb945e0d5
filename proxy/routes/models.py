"""GET /v1/models: the models of every upstream, merged."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy.errors import ProxyError, UpstreamError
from proxy.routes.state import AppState
from proxy.upstreams.discovery import list_models
from proxy.upstreams.registry import Route

log = logging.getLogger("mnemoproxy.models")

LIST_TIMEOUT = 10.0
# A model name no rule knows makes the proxy ask the upstreams what they serve (waiting
# at most ASK_TIMEOUT), at most once per ASK_EVERY_S.
ASK_TIMEOUT = 3.0
ASK_EVERY_S = 30.0


async def route_for(
    state: AppState, model: str | None, client_headers: dict[str, str] | None = None
) -> Route:
    """The route for `model` (`Router.pick`). With several upstreams, a name that no
    rule knows first makes the proxy list their models, so that a model only one of
    them serves goes there by its bare name even when the app never listed the models
    (it kept the name from an earlier session); a name still unknown goes to the
    default upstream, as before."""
    router = state.router
    if model and len(router.upstreams) > 1 and router.match(model) is None:
        async with state.asking_models:  # concurrent requests wait for one answer
            if router.match(model) is None and router.may_ask(time.monotonic(), ASK_EVERY_S):
                try:
                    await merged_models(state, client_headers, timeout=ASK_TIMEOUT)
                except Exception:  # routing goes on without the lists
                    log.exception("could not list the upstreams' models for %r", model)
    return router.pick(model)


async def merged_models(
    state: AppState, client_headers: dict[str, str] | None = None, timeout: float = LIST_TIMEOUT
) -> tuple[list[dict], list[str]]:
    """Every upstream's models, each listed under an id that routes back to it, and the
    errors of the upstreams that did not answer (each within `timeout` in all, however
    it dribbles its answer)."""
    upstreams = list(state.router.upstreams.values())
    results = await asyncio.gather(
        *(
            asyncio.wait_for(
                list_models(state.pool, u, timeout=timeout, client_headers=client_headers),
                timeout,
            )
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
        if isinstance(result, TimeoutError):
            errors.append(f"upstream {upstream.name!r} did not list its models in {timeout:.0f} s")
            continue
        if isinstance(result, BaseException):
            raise result
        listed[upstream.name] = [entry["id"] for entry in result]
    state.router.learn(listed)  # those that did not answer keep their last lists
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
