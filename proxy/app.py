"""The ASGI application: routes, error rendering, and the lifespan that owns resources."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import platformdirs
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.background import background_config, memory_model
from proxy.errors import ProxyError, error_envelope
from proxy.inject.tokens import prepare_tiktoken_cache
from proxy.memory.embed import (
    CachedEmbedder,
    Embedder,
    LocalEmbedder,
    OnnxEmbedder,
    UpstreamEmbedder,
)
from proxy.memory.store import Store
from proxy.memory.worker import Activity, Worker
from proxy.metrics import Metrics
from proxy.routes import health, memory_api, models
from proxy.routes.auth import Auth
from proxy.routes.chat import ChatCompletions
from proxy.routes.passthrough import PassThrough
from proxy.routes.plan import Memory, NoMemory
from proxy.routes.remember import Remember
from proxy.routes.state import AppState
from proxy.settings import Settings
from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.gate import UpstreamGate
from proxy.upstreams.registry import Router, Upstream
from proxy.upstreams.windows import ContextWindows

log = logging.getLogger("mnemoproxy")


def router_from_settings(settings: Settings) -> Router:
    """The model router for the configured upstreams and routes."""
    upstreams = [
        Upstream(
            name=name,
            base_url=cfg.base_url,
            api_key=cfg.api_key.get_secret_value() if cfg.api_key else None,
            models=frozenset(cfg.models),
            prefix=cfg.prefix if cfg.prefix is not None else name,
            forward_client_key=cfg.forward_client_key,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            context_window=cfg.context_window,
            max_connections=cfg.max_connections,
            slots=cfg.slots,
        )
        for name, cfg in settings.upstreams.items()
    ]
    default = settings.server.default_upstream
    if not default and len(upstreams) == 1:
        default = upstreams[0].name
    return Router(upstreams, settings.routes, default or None)


def v1_routes() -> list[BaseRoute]:
    """The OpenAI-compatible surface, mounted at / and at /s/{scope}/."""
    return [
        Route("/v1/chat/completions", ChatCompletions(), methods=["POST"]),
        Route("/v1/models", models.models, methods=["GET"]),
        Route(
            "/v1/{path:path}",
            PassThrough(),
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        ),
    ]


def build_app(settings: Settings) -> Starlette:
    """Build the proxy for `settings`. Resources are opened by the lifespan, not here."""
    router = router_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            pool = UpstreamPool(router.upstreams)
            stack.push_async_callback(pool.aclose)
            metrics = Metrics()
            gate = UpstreamGate({u.name: u.slots for u in router.upstreams.values()})
            memory: Memory = NoMemory()
            if settings.memory.enabled:
                memory = await open_memory(settings, router, pool, metrics, stack, gate)
            app.state.proxy = AppState(
                router=router,
                pool=pool,
                auth=Auth(
                    [k.get_secret_value() for k in settings.auth.keys],
                    [k.get_secret_value() for k in settings.auth.admin_keys],
                ),
                memory=memory,
                metrics=metrics,
                max_body_bytes=settings.server.max_body_bytes,
                gate=gate,
            )
            yield

    routes: list[BaseRoute] = [
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Mount("/memory", routes=memory_api.routes()),  # 503 while memory is off
        *v1_routes(),
        Mount("/s/{scope}", routes=v1_routes()),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error},
    )
    app.add_middleware(CountRequests)
    return app


def database_path(settings: Settings) -> Path:
    """The memory database file: configured, else in the user's data directory."""
    if settings.memory.database:
        return Path(settings.memory.database).expanduser()
    return Path(platformdirs.user_data_dir("mnemoproxy", appauthor=False)) / "memory.db"


# Seconds before the upstream embedding backend is tried again after a failed start,
# doubling up to the second figure.
START_RETRY_S = 1.0
START_RETRY_MAX_S = 60.0


def build_embedder(
    settings: Settings,
    router: Router,
    stack: contextlib.AsyncExitStack | None = None,
    pool: UpstreamPool | None = None,
) -> Embedder:
    """The embedder that `[embeddings]` asks for (not started); `stack` closes its HTTP
    client, if it has one; `pool` lends it the client key its upstream accepted, if
    that upstream forwards client keys."""
    cfg = settings.embeddings
    model = cfg.model or None
    if cfg.backend == "onnx":
        return OnnxEmbedder(model, threads=cfg.threads)
    if cfg.backend == "upstream":
        upstream = router.upstreams[cfg.upstream]
        client = httpx.AsyncClient(timeout=upstream.read_timeout, trust_env=False)
        if stack is not None:
            stack.push_async_callback(client.aclose)
        lent = None
        if pool is not None and upstream.forward_client_key:
            lent = functools.partial(pool.lent_headers, upstream)
        return UpstreamEmbedder(
            upstream.base_url,
            upstream.api_key,
            cfg.model or "text-embedding-3-small",
            client,
            batch_size=cfg.batch_size,
            lent_headers=lent,
        )
    cache = Path(platformdirs.user_cache_dir("mnemoproxy", appauthor=False)) / "query-models"
    return LocalEmbedder(
        model, threads=cfg.threads, query_cache=cache if cfg.fast_queries else None
    )


async def open_memory(
    settings: Settings,
    router: Router,
    pool: UpstreamPool,
    metrics: Metrics,
    stack: contextlib.AsyncExitStack,
    gate: UpstreamGate | None = None,
) -> Remember:
    """Open the store, start loading the embedding model and start the worker.

    The model loads in the background so that the proxy answers at once; until it is
    ready, recall uses keyword search only and says so (`X-Memory-Error: warming up`).
    """
    prepare_tiktoken_cache(
        Path(platformdirs.user_cache_dir("mnemoproxy", appauthor=False)) / "tiktoken"
    )
    store = Store(database_path(settings), readers=settings.memory.readers)
    await store.start()
    stack.push_async_callback(store.close)
    embedder = CachedEmbedder(
        build_embedder(settings, router, stack, pool), settings.embeddings.cache_size
    )
    activity = Activity()
    background = background_config(settings)
    windows = ContextWindows(pool, settings.memory.default_context_window)
    worker = Worker(
        store,
        embedder,
        activity,
        model=memory_model(settings, router, pool, gate or UpstreamGate(), metrics, windows),
        config=background,
        prompts=settings.prompt_texts(),
    )
    await worker.start()
    stack.push_async_callback(worker.stop)
    stack.push_async_callback(await memory_api.start_upkeep(settings, store, worker, metrics))
    remember = Remember(
        settings=settings,
        store=store,
        embedder=embedder,
        windows=windows,
        templates=settings.template_texts(),
        worker=worker,
        activity=activity,
        metrics=metrics,
        background=background if background.enabled else None,
    )

    async def load_model() -> None:
        # A model server may start after the proxy, or be restarting: the upstream
        # backend tries again, ever less often. A local model that fails to load
        # would fail the same way again.
        wait = START_RETRY_S
        while True:
            try:
                await embedder.start()
                break
            except Exception as exc:
                remember.embedder_error = f"embedding model unavailable: {exc}"
                if settings.embeddings.backend != "upstream":
                    log.error("%s; recall falls back to keyword search", remember.embedder_error)
                    return
                log.warning(
                    "%s; recall uses keyword search, trying again in %.0f s",
                    remember.embedder_error,
                    wait,
                )
            await asyncio.sleep(wait)
            wait = min(wait * 2, START_RETRY_MAX_S)
        remember.embedder_error = None
        log.info("embedding model %s ready", embedder.model_id)
        worker.embedder_ready()

    loading = asyncio.create_task(load_model(), name="mnemoproxy-embedder")

    async def stop_loading() -> None:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await embedder.close()

    stack.push_async_callback(stop_loading)
    metrics.gauges["memory_store_pending_writes"] = lambda: store.pending_writes
    return remember


async def _proxy_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProxyError)
    return JSONResponse(exc.envelope(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    where = f"{request.method} {request.url.path}"
    headers = exc.headers
    if exc.status_code == 404:
        message = f"no such endpoint: {where}"
    elif exc.status_code == 405:
        # Starlette's Allow names the methods of the first route on the path only; each
        # memory API method is a route of its own, so the others are found here.
        served = _allowed_methods(request.app.router.routes, _fresh(request))
        allowed = ", ".join(sorted(served)) or (exc.headers or {}).get("Allow", "")
        headers = {**(exc.headers or {}), "Allow": allowed}
        message = f"method not allowed: {where}" + (f" (allowed: {allowed})" if allowed else "")
    else:
        message = str(exc.detail)
    # A 405 keeps its Allow header, as HTTP asks (clients and tools read it).
    return JSONResponse(error_envelope(message, kind), status_code=exc.status_code, headers=headers)


def _fresh(request: Request) -> Scope:
    """The request's scope as it came in: routing has since moved its root_path into
    the mount that matched (Mount keeps the original as app_root_path)."""
    scope = request.scope
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    return {
        "type": "http",
        "method": scope["method"],
        "path": scope["path"],
        "root_path": root_path,
    }


def _allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> set[str]:
    """Every method that some route among `routes` (mounts searched) serves at the
    path of `scope`."""
    allowed: set[str] = set()
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            allowed |= _allowed_methods(route.routes, {**scope, **child})
        elif isinstance(route, Route) and route.methods:
            allowed |= route.methods
    return allowed


class CountRequests:
    """Counts answered requests by route and status for /metrics, and answers an
    unexpected exception with OpenAI's 500 envelope (the traceback goes to the log,
    never to the client).

    Starlette's own handler for `Exception` raises it again after answering, and the
    server then drops the connection: a client's next request on it (kept alive)
    failed. Here the answer ends the request, and the connection stays usable.

    It sees every message of every response, so it is kept cheap: the wrapper is a
    plain function that returns `send`'s own awaitable (no coroutine of its own per
    message) and stops looking once it has the status.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        def send_wrapper(message: Message) -> Awaitable[None]:
            nonlocal status
            if not status and message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if status:  # half an answer is out: only dropping the connection tells
                raise
            log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            envelope = error_envelope("internal error in mnemoproxy; see its log", "server_error")
            await JSONResponse(envelope, status_code=500)(scope, receive, send_wrapper)
        finally:
            state = getattr(scope["app"].state, "proxy", None) if "app" in scope else None
            if state is not None and status:
                state.metrics.count_request(_route_label(scope["path"]), status)


def _route_label(path: str) -> str:
    # Bounded label values: collapse scopes and passthrough paths.
    if path.startswith("/s/"):
        path = "/" + path.split("/", 3)[-1] if path.count("/") >= 3 else path
    if path.startswith("/v1/") and path not in ("/v1/chat/completions", "/v1/models"):
        return "/v1/*"
    return (
        path
        if path in ("/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics")
        else "other"
    )
