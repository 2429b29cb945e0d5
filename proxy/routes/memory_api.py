"""/memory: see and steer what the proxy remembers (JSON over HTTP).

Every endpoint is one `Operation` in `OPERATIONS` (method, path, handler, shapes);
`routes()` turns them into Starlette routes (served by `memory_calls.endpoint`) and
`openapi.openapi_document` into the description served at /memory/openapi.json. The
work itself is in `proxy.memory.manage` and `proxy.memory.exchange`.

Scopes are addressed by name within the caller's owner (its key); an admin key may
name another owner with `?owner=`. A scope of another key answers 404 exactly as a
scope that does not exist, so that existence never leaks. After every change the chat
path's caches of that scope are dropped (`Remember.forget_scope`).

The same routes serve the CLI's direct mode: `standalone_app` mounts them over a
store opened from the file, with a fixed caller and no running proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from proxy.errors import BadRequest, NotFound, error_envelope
from proxy.memory import exchange, jobs, manage, records
from proxy.memory.importers import CardError, parse_card, parse_chat
from proxy.memory.manage import Housekeeping
from proxy.memory.store import Store
from proxy.memory.worker import Worker
from proxy.metrics import Metrics
from proxy.routes import openapi as api
from proxy.routes.memory_calls import (
    Call,
    MemoryService,
    choices,
    endpoint,
)
from proxy.routes.openapi import Operation
from proxy.routes.validation import parse_date
from proxy.settings import Settings

log = logging.getLogger("mnemoproxy.memory_api")

API_VERSION = "1"


# -- scopes ------------------------------------------------------------------------------


async def list_scopes(call: Call) -> Any:
    if not call.identity.admin:
        owner: str | None = call.identity.owner
        if call.query.owner not in (None, owner):
            return {"scopes": []}
    else:
        owner = call.query.owner
    return {"scopes": await call.read(manage.scope_views, owner)}


async def create_scope(call: Call) -> Any:
    if call.owner is None:
        raise NotFound("no such owner", param="owner")
    return await call.service.store.write(
        manage.create_scope, call.owner, call.body.name, call.body.label, call.now
    )


async def show_scope(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(manage.scope_view, scope)


async def patch_scope(call: Call) -> Any:
    scope = await call.scope()
    name = call.body.name  # a valid scope name, checked by the model (`api.ScopeName`)
    label = call.body.label
    if label is None and "label" in call.body.model_fields_set:
        label = ""  # "label": null removes it (left out, it stays)
    row = await call.write(scope, manage.rename_scope, scope.id, name, label)
    return await call.read(manage.scope_view, row)


async def delete_scope(call: Call) -> Any:
    scope = await call.scope()
    await call.write(scope, manage.delete_scope, scope.id)


async def get_settings(call: Call) -> Any:
    scope = await call.scope()
    return manage.settings_view(scope.settings)


async def patch_settings(call: Call) -> Any:
    scope = await call.scope()
    changes = call.body.model_dump(exclude_none=True)
    return await call.write(scope, manage.update_settings, scope.id, changes)


async def get_scene(call: Call) -> Any:
    scope = await call.scope()
    return manage.scene_view(scope.settings)


async def put_scene(call: Call) -> Any:
    scope = await call.scope()
    values = call.body.model_dump(exclude_none=True)
    return await call.write(scope, manage.set_scene, scope.id, values, replace=True)


async def patch_scene(call: Call) -> Any:
    scope = await call.scope()
    values = call.body.model_dump(exclude_unset=True)
    return await call.write(scope, manage.set_scene, scope.id, values, replace=False)


async def delete_scene(call: Call) -> Any:
    scope = await call.scope()
    await call.write(scope, manage.set_scene, scope.id, {}, replace=True)


# -- transcript ----------------------------------------------------------------------


async def get_transcript(call: Call) -> Any:
    scope = await call.scope()
    q = call.query
    states = choices(q.state, ("active", "partial", "undone"), "state") or (
        "active",
        "partial",
        "undone",
    )
    return await call.read(
        manage.transcript,
        scope.id,
        states=states,
        thread=q.thread,
        after_seq=q.after,
        limit=q.limit,
        raw=q.raw,
    )


async def append_transcript(call: Call) -> Any:
    body = call.body
    scope = await call.scope(create=True)
    messages = [
        exchange.ChatMessage(m.role, m.content, m.name, _date(m.date, f"messages.{i}.date"))
        for i, m in enumerate(body.messages)
    ]
    result = await call.write(
        scope,
        exchange.append_chat,
        scope.id,
        messages,
        thread=body.thread,
        append=body.append,
        now=call.now,
        char=body.char_name,
        user=body.user_name,
    )
    call.service.wake()
    return result


def _date(value: float | str | None, param: str) -> float | None:
    """A message's date, in unix seconds or ISO 8601 (`parse_date`), as unix seconds."""
    return None if value is None else parse_date(str(value), param)


# -- memories ----------------------------------------------------------------------------


async def list_memories(call: Call) -> Any:
    scope = await call.scope()
    q = call.query
    kinds = choices(q.kind, records.MEMORY_KINDS, "kind")
    states = choices(q.state, (*manage.MEMORY_STATES, "all"), "state") or ("active",)
    if "all" in states:  # "all,active" is still all of them
        states = manage.MEMORY_STATES
    return await call.read(
        manage.list_memories,
        scope.id,
        kinds=kinds,
        states=states,
        since=parse_date(q.since, "since") if q.since else None,
        pinned=q.pinned,
        before_id=q.before,
        limit=q.limit,
    )


async def add_memory(call: Call) -> Any:
    scope = await call.scope()
    b = call.body
    result = await call.write(
        scope,
        manage.add_note,
        scope.id,
        b.text,
        now=call.now,
        importance=b.importance,
        pinned=b.pinned,
    )
    call.service.wake()
    return result


async def search_memories(call: Call) -> Any:
    scope = await call.scope()
    q = call.query
    weights = call.service.weights
    if q.min_score is not None:
        weights = replace(weights, min_score=q.min_score)
    return await manage.search(
        call.service.store,
        scope.id,
        q.q,
        embedder=call.service.embedder,
        weights=weights,
        candidates=max(call.service.candidates, q.limit),
        limit=q.limit,
        now=call.now,
    )


async def get_memory(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(manage.get_memory, scope.id, call.params["memory_id"])


async def patch_memory(call: Call) -> Any:
    scope = await call.scope()
    b = call.body
    result = await call.write(
        scope,
        manage.edit_memory,
        scope.id,
        call.params["memory_id"],
        now=call.now,
        text=b.text,
        importance=b.importance,
        pinned=b.pinned,
    )
    call.service.wake()
    return result


async def delete_memory(call: Call) -> Any:
    scope = await call.scope()
    await call.write(scope, manage.delete_memory, scope.id, call.params["memory_id"])


# -- summary and style ----------------------------------------------------------------


async def get_summary(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(manage.get_summary, scope.id)


async def put_summary(call: Call) -> Any:
    scope = await call.scope()
    b = call.body
    return await call.write(
        scope,
        manage.set_summary,
        scope.id,
        b.text,
        now=call.now,
        covers_until_seq=b.covers_until_seq,
    )


async def delete_summary(call: Call) -> Any:
    scope = await call.scope()
    await call.write(scope, manage.clear_summary, scope.id)


async def summary_history(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(manage.summary_history, scope.id)


async def get_style(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(manage.get_style, scope.id)


async def put_style(call: Call) -> Any:
    scope = await call.scope()
    return await call.write(scope, manage.set_style, scope.id, call.body.text, now=call.now)


async def delete_style(call: Call) -> Any:
    scope = await call.scope()
    await call.write(scope, manage.clear_style, scope.id, now=call.now)


async def style_history(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(manage.style_history, scope.id)


# -- request log ------------------------------------------------------------------------


async def list_requests(call: Call) -> Any:
    scope = await call.scope()
    q = call.query
    before: float | jobs.LogPosition | None = q.before
    if q.cursor is not None:
        if q.before is not None:
            raise BadRequest("give cursor or before, not both", param="cursor")
        before = manage.parse_request_cursor(q.cursor)  # Invalid: a 400 of "cursor"
    return await call.read(manage.list_requests, scope.id, before=before, limit=q.limit)


async def get_request(call: Call) -> Any:
    request_id = call.params["request_id"]
    if call.owner is None:
        raise NotFound(f"no logged request {request_id!r}")
    # An admin sees every request unless it named an owner.
    owner = None if call.identity.admin and call.query.owner is None else call.owner
    return await call.read(manage.get_request, owner, request_id)


# -- export and import ------------------------------------------------------------------


async def export_scope(call: Call) -> Any:
    scope = await call.scope()
    return await call.read(exchange.export_scope, scope.id)


async def import_scope(call: Call) -> Any:
    doc = await asyncio.to_thread(_document, call.body)
    scope = await call.scope(create=True)
    try:
        result = await exchange.import_scope(
            call.service.store, scope.id, doc, append=call.query.append, now=call.now
        )
    finally:
        call.service.forget(None, scope.id)
    call.service.wake()
    return result


def _document(body: api.ScopeDocument) -> dict[str, Any]:
    doc = body.model_dump()
    # Only the settings the document sets: an unset one keeps its default.
    doc["scope"]["settings"] = body.scope.settings.model_dump(exclude_none=True)
    exchange.check_document(doc)  # before the scope is made
    return doc


async def import_sillytavern(call: Call) -> Any:
    chat = await asyncio.to_thread(parse_chat, call.body.splitlines())
    if not chat.messages:
        problems = "; ".join(f"line {e.line}: {e.message}" for e in chat.errors[:5])
        raise BadRequest(
            "no message could be read from the chat file"
            + (f" ({problems})" if problems else ": it holds no messages")
        )
    scope = await call.scope(create=True)
    try:
        result = await exchange.import_chat(
            call.service.store, scope.id, chat, append=call.query.append, now=call.now
        )
    finally:
        call.service.forget(None, scope.id)
    if scope.label is None and chat.character_name:
        await call.write(scope, records.rename_scope, scope.id, label=chat.character_name)
    call.service.wake()
    return result


async def import_card(call: Call) -> Any:
    try:
        card = await asyncio.to_thread(parse_card, call.body, call.query.filename)
    except CardError as exc:
        raise BadRequest(f"not a usable character card: {exc}") from exc
    scope = await call.scope(create=True)
    result = await call.write(
        scope, exchange.apply_card, scope.id, card, append=call.query.append, now=call.now
    )
    call.service.wake()
    return result


# -- the table --------------------------------------------------------------------------

_S = "/scopes/{scope}"
_CONFLICT = (400, 401, 404, 409, 503)
_UPLOAD = (400, 401, 404, 409, 413, 503)
_Q = api.OwnerQuery
# A scope's summary, style sample and scene are parts of it, not things of their own:
# clearing one it has none of leaves it as asked (idempotent), where a scope or memory
# named in the path that does not exist is a 404, the second DELETE of it included.
_CLEARED = "Cleared; also when the scope had none (it has none now either way)."

OPERATIONS: list[Operation] = [
    Operation(
        "GET", "/scopes", list_scopes, "List scopes", "scopes", query=_Q, response=api.ScopeList
    ),
    Operation(
        "POST",
        "/scopes",
        create_scope,
        "Create an empty scope (to set its scene before the first chat)",
        "scopes",
        query=_Q,
        body=api.ScopeCreate,
        response=api.ScopeOut,
        status=201,
        errors=_CONFLICT,
    ),
    Operation("GET", _S, show_scope, "Show a scope", "scopes", query=_Q, response=api.ScopeOut),
    Operation(
        "PATCH",
        _S,
        patch_scope,
        "Rename a scope or change its label",
        "scopes",
        query=_Q,
        body=api.ScopePatch,
        response=api.ScopeOut,
        errors=_CONFLICT,
    ),
    Operation(
        "DELETE",
        _S,
        delete_scope,
        "Delete a scope with everything in it",
        "scopes",
        query=_Q,
        status=204,
    ),
    Operation(
        "GET",
        f"{_S}/settings",
        get_settings,
        "Scope settings",
        "scopes",
        query=_Q,
        response=api.Switches,
    ),
    Operation(
        "PATCH",
        f"{_S}/settings",
        patch_settings,
        "Turn memory or the style sample on or off for a scope",
        "scopes",
        query=_Q,
        body=api.SettingsPatch,
        response=api.Switches,
    ),
    Operation("GET", f"{_S}/scene", get_scene, "The scene", "scene", query=_Q, response=api.Scene),
    Operation(
        "PUT",
        f"{_S}/scene",
        put_scene,
        "Replace the scene",
        "scene",
        query=_Q,
        body=api.SceneIn,
        response=api.Scene,
    ),
    Operation(
        "PATCH",
        f"{_S}/scene",
        patch_scene,
        "Change parts of the scene (null removes one)",
        "scene",
        query=_Q,
        body=api.SceneIn,
        response=api.Scene,
    ),
    Operation(
        "DELETE",
        f"{_S}/scene",
        delete_scene,
        "Clear the scene",
        "scene",
        query=_Q,
        status=204,
        done=_CLEARED,
    ),
    Operation(
        "GET",
        f"{_S}/transcript",
        get_transcript,
        "The messages as stored, with state and chat (thread)",
        "transcript",
        query=api.TranscriptQuery,
        response=api.Transcript,
    ),
    Operation(
        "POST",
        f"{_S}/transcript",
        append_transcript,
        "Import chat messages (a batch; later batches name the first one's thread)",
        "import",
        query=_Q,
        body=api.TranscriptAppend,
        response=api.AppendResult,
        errors=_CONFLICT,
    ),
    Operation(
        "GET",
        f"{_S}/memories",
        list_memories,
        "List memories (filters: kind, state, since, pinned)",
        "memories",
        query=api.MemoriesQuery,
        response=api.MemoryList,
    ),
    Operation(
        "POST",
        f"{_S}/memories",
        add_memory,
        "Add a note by hand (pinned: shown on every turn)",
        "memories",
        query=_Q,
        body=api.NoteIn,
        response=api.MemoryOut,
        status=201,
    ),
    Operation(
        "GET",
        f"{_S}/memories/search",
        search_memories,
        "Search as recall does, with scores and their components",
        "memories",
        query=api.SearchQuery,
        response=api.SearchResult,
    ),
    Operation(
        "GET",
        f"{_S}/memories/{{memory_id}}",
        get_memory,
        "Show a memory",
        "memories",
        query=_Q,
        response=api.MemoryOut,
    ),
    Operation(
        "PATCH",
        f"{_S}/memories/{{memory_id}}",
        patch_memory,
        "Edit a memory (re-embedded), its importance, or pin it",
        "memories",
        query=_Q,
        body=api.MemoryPatch,
        response=api.MemoryOut,
        errors=_CONFLICT,
    ),
    Operation(
        "DELETE",
        f"{_S}/memories/{{memory_id}}",
        delete_memory,
        "Delete a memory",
        "memories",
        query=_Q,
        status=204,
    ),
    Operation(
        "GET",
        f"{_S}/summary",
        get_summary,
        "The rolling summary",
        "summary",
        query=_Q,
        response=api.SummaryCurrent,
    ),
    Operation(
        "PUT",
        f"{_S}/summary",
        put_summary,
        "Replace the rolling summary",
        "summary",
        query=_Q,
        body=api.SummaryIn,
        response=api.SummaryCurrent,
    ),
    Operation(
        "DELETE",
        f"{_S}/summary",
        delete_summary,
        "Clear the summary",
        "summary",
        query=_Q,
        status=204,
        done=_CLEARED,
    ),
    Operation(
        "GET",
        f"{_S}/summary/history",
        summary_history,
        "Every version of the summary",
        "summary",
        query=_Q,
        response=api.SummaryHistory,
    ),
    Operation(
        "GET",
        f"{_S}/style",
        get_style,
        "The style sample",
        "style",
        query=_Q,
        response=api.StyleCurrent,
    ),
    Operation(
        "PUT",
        f"{_S}/style",
        put_style,
        "Replace the style sample",
        "style",
        query=_Q,
        body=api.StyleIn,
        response=api.StyleCurrent,
    ),
    Operation(
        "DELETE",
        f"{_S}/style",
        delete_style,
        "Clear the style sample",
        "style",
        query=_Q,
        status=204,
        done=_CLEARED,
    ),
    Operation(
        "GET",
        f"{_S}/style/history",
        style_history,
        "Earlier style samples",
        "style",
        query=_Q,
        response=api.StyleHistory,
    ),
    Operation(
        "GET",
        f"{_S}/requests",
        list_requests,
        "The request log of a scope, newest first",
        "requests",
        query=api.RequestsQuery,
        response=api.RequestList,
    ),
    Operation(
        "GET",
        "/requests/{request_id}",
        get_request,
        "What was sent upstream for a request (X-Memory-Request-Id) and why",
        "requests",
        query=_Q,
        response=api.RequestOut,
    ),
    Operation(
        "GET",
        f"{_S}/export",
        export_scope,
        "Export a scope as one JSON document",
        "import",
        query=_Q,
        response=api.ScopeDocument,
        heavy=True,
    ),
    Operation(
        "POST",
        f"{_S}/import",
        import_scope,
        "Import a scope document (created if missing)",
        "import",
        query=api.ImportQuery,
        body=api.ScopeDocument,
        response=api.ImportResult,
        errors=_UPLOAD,
        heavy=True,
    ),
    Operation(
        "POST",
        f"{_S}/import/sillytavern",
        import_sillytavern,
        "Import a SillyTavern chat file (.jsonl) as a new chat of the scope",
        "import",
        query=api.ImportQuery,
        raw_body=("application/x-ndjson", "text/plain", "application/octet-stream"),
        response=api.ChatImportResult,
        errors=_UPLOAD,
        heavy=True,
    ),
    Operation(
        "POST",
        f"{_S}/import/card",
        import_card,
        "Import a character card (PNG or JSON, V1-V3): scene, style sample, notes",
        "import",
        query=api.CardQuery,
        raw_body=("image/png", "application/json", "application/octet-stream"),
        response=api.CardResult,
        errors=_UPLOAD,
        heavy=True,
    ),
]


# -- plumbing --------------------------------------------------------------------------


def routes() -> list[BaseRoute]:
    """The memory API's routes, to mount at /memory."""
    out: list[BaseRoute] = [
        Route("/", index, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    for op in OPERATIONS:
        path = op.path.replace("{memory_id}", "{memory_id:int}")
        out.append(Route(path, endpoint(op), methods=[op.method], name=op.handler.__name__))
    return out


_DOCUMENT: dict[str, Any] = {}


async def index(request: Request) -> JSONResponse:
    """What /memory/ is: the API's version and where its description is (no key
    needed), rather than a 404 for someone who types the base path."""
    base = request.url.path.rstrip("/")
    return JSONResponse(
        {"object": "memory_api", "version": API_VERSION, "openapi": f"{base}/openapi.json"}
    )


async def openapi_json(request: Request) -> JSONResponse:
    """The OpenAPI description of the memory API (no key needed)."""
    if not _DOCUMENT:
        _DOCUMENT.update(api.openapi_document(OPERATIONS, version=API_VERSION))
    return JSONResponse(_DOCUMENT)


# -- direct mode and wiring ------------------------------------------------------------------


def standalone_app(service: MemoryService) -> Starlette:
    """The memory API alone, over `service` (the CLI's direct mode: no proxy running)."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse(error_envelope(message, "not_found_error"), exc.status_code)

    app = Starlette(
        routes=[Mount("/memory", routes=routes())],
        exception_handlers={HTTPException: http_error},
    )
    app.state.memory_service = service
    return app


async def start_upkeep(
    settings: Settings, store: Store, worker: Worker, metrics: Metrics
) -> Callable[[], Awaitable[None]]:
    """Start the lifespan's housekeeping (request-log retention, job counts for
    /metrics) and register the job gauges; returns the coroutine that stops it."""
    cfg = settings.request_log
    upkeep = Housekeeping(store, keep_days=cfg.keep_days, keep_per_scope=cfg.keep_per_scope)
    for state in ("pending", "running", "failed"):
        metrics.gauges[f"jobs_{state}"] = lambda state=state: upkeep.jobs[state]
    metrics.gauges["worker_failures"] = lambda: worker.failures
    return await upkeep.start()
