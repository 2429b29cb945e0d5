"""How one memory API call is served: who calls, on which scope, with what input.

`endpoint(op)` turns an `Operation` (see `proxy.routes.openapi`) into a Starlette
endpoint: it finds the `MemoryService` (the running proxy's memory layer, or the CLI's
direct one), identifies the caller, validates query and body against the operation's
models, runs the handler with a `Call`, and answers JSON or an error in OpenAI's
envelope. Big documents are parsed and rendered off the event loop.

Errors: the memory layer's own (`proxy.memory.errors`: `Invalid`, `Missing`,
`Refused`) become 400, 404 and 409; any other exception is a bug, whatever its type (a
`ValueError` from a library too), and answers 500 without a word of it, its traceback
in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.errors import (
    INTERNAL_ERROR,
    BadRequest,
    Conflict,
    InvalidScopeName,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    ServiceUnavailable,
)
from proxy.json_finite import finite_only, loads_finite
from proxy.memory import records
from proxy.memory.embed import CachedEmbedder
from proxy.memory.errors import Invalid, Missing, Refused
from proxy.memory.rank import Weights
from proxy.memory.records import ScopeRow
from proxy.memory.scope import InvalidScope, validate_scope_name
from proxy.memory.store import Store
from proxy.routes import openapi as api
from proxy.routes.auth import Identity
from proxy.routes.openapi import SCOPE_ERROR, Operation
from proxy.routes.remember import Remember

log = logging.getLogger("mnemoproxy.memory_api")

# A scope document or a chat file may be far larger than a chat request.
IMPORT_BODY_BYTES = 512 * 1024 * 1024
M = TypeVar("M", bound=BaseModel)


@dataclass
class MemoryService:
    """What the memory API works with: the store, recall's settings, the chat path's
    caches and worker, and (in the CLI's direct mode) a fixed caller."""

    store: Store
    weights: Weights
    candidates: int
    embedder: CachedEmbedder | None = None
    forget: Callable[[str | None, int | None], None] = lambda owner, scope_id: None
    wake: Callable[[], None] = lambda: None
    identity: Identity | None = None  # None: ask the proxy's Auth
    max_body_bytes: int = 32 * 1024 * 1024

    @classmethod
    def of(cls, remember: Remember, max_body_bytes: int) -> MemoryService:
        """The service over a running proxy's memory layer."""
        return cls(
            store=remember.store,
            weights=remember.weights,
            candidates=remember.settings.recall.candidates,
            embedder=remember.embedder,
            forget=remember.forget_scope,
            wake=remember.worker.wake,
            max_body_bytes=max_body_bytes,
        )


@dataclass
class Call:
    """One API call, parsed: who calls, on what, with which parameters."""

    service: MemoryService
    identity: Identity
    owner: str | None  # whose scopes names refer to; None: nobody's (a non-admin's ?owner=)
    params: dict[str, Any]
    query: Any
    body: Any
    now: float
    created: ScopeRow | None = None  # the scope this call made (`scope(create=True)`)

    async def scope(self, *, create: bool = False) -> ScopeRow:
        """The scope named in the path, of the caller's owner (404 if none; with
        `create`, made when missing)."""
        name = self.params["scope"]
        try:
            validate_scope_name(name)
        except InvalidScope as exc:
            raise InvalidScopeName(str(exc), param="scope") from exc
        store = self.service.store
        row = None if self.owner is None else await store.read(records.get_scope, self.owner, name)
        if row is None and create and self.owner is not None:
            row = await store.write(records.get_or_create_scope, self.owner, name, None, self.now)
            self.created = row
        if row is None:
            raise NotFound(await self._missing_scope(name), param="scope")
        return row

    async def _missing_scope(self, name: str) -> str:
        """Why the scope is not found; to an admin, which owners have one of that name
        (a database of several keys is read owner by owner)."""
        message = f"no scope named {name!r}"
        if not self.identity.admin:  # another key's scopes are not even named
            return message
        owners = [o for o in await self.read(records.owners_of_scope, name) if o != self.owner]
        if owners:
            shown = ", ".join(repr(o) for o in owners[:5])
            who = "owner {} has one" if len(owners) == 1 else "owners {} have one"
            message += f"; {who.format(shown)}: pass ?owner= (CLI: --owner)"
        return message

    async def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(conn, ...)` on a reader thread."""
        return await self.service.store.read(fn, *args, **kwargs)

    async def write(self, scope: ScopeRow, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run `fn(conn, ...)` on the writer, then drop the chat path's caches of `scope`
        (even when it failed: part of it may have been written)."""
        try:
            return await self.service.store.write(fn, *args, **kw)
        finally:
            self.service.forget(None, scope.id)


def endpoint(op: Operation) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint that serves `op`."""

    async def serve(request: Request) -> Response:
        try:
            return await _respond(op, await _run(op, request))
        except ProxyError as exc:
            return JSONResponse(exc.envelope(), status_code=exc.status)
        except Exception:
            # A bug. Answered here, not by the proxy's middleware, so that the CLI's
            # direct mode (no middleware) gets the same envelope instead of an exception.
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            error = ProxyError(INTERNAL_ERROR)
            return JSONResponse(error.envelope(), status_code=error.status)

    serve.__name__ = op.handler.__name__
    return serve


async def _respond(op: Operation, result: Any) -> Response:
    if op.response is None:
        return Response(status_code=op.status)
    if op.heavy:
        content = await asyncio.to_thread(_render, result)
        return Response(content, op.status, media_type="application/json")
    return JSONResponse(result, status_code=op.status)


async def _run(op: Operation, request: Request) -> Any:
    service = _service(request)
    identity = service.identity or request.app.state.proxy.auth.identify(request.headers)
    query = _model(op.query, dict(request.query_params), "query") if op.query else None
    params = dict(request.path_params)
    if "memory_id" in params and not 0 < params["memory_id"] <= api.MAX_ID:
        raise NotFound(f"no memory {params['memory_id']} in this scope")
    body: Any = None
    if op.body is not None or op.raw_body:
        limit = max(service.max_body_bytes, IMPORT_BODY_BYTES if op.heavy else 0)
        raw = await _read_body(request, limit)
        if op.raw_body:
            body = raw
        elif op.heavy:
            body = await asyncio.to_thread(_parse, op.body, raw)
        else:
            body = _parse(op.body, raw)
    requested = getattr(query, "owner", None)
    call = Call(
        service=service,
        identity=identity,
        owner=_owner(identity, requested),
        params=params,
        query=query,
        body=body,
        now=time.time(),
    )
    try:
        return await _handled(op, call)
    except Exception:
        if call.created is not None:  # a call that failed leaves no scope of its making
            await call.write(call.created, records.delete_scope_if_empty, call.created.id)
        raise


async def _handled(op: Operation, call: Call) -> Any:
    """`op`'s handler, the memory layer's errors as the API's. Only those: a plain
    `ValueError` is a bug like any other exception, and goes on to answer 500."""
    try:
        return await op.handler(call)
    except Missing as exc:
        raise NotFound(str(exc)) from exc
    except Refused as exc:
        raise Conflict(str(exc)) from exc
    except InvalidScope as exc:
        raise InvalidScopeName(str(exc), param=exc.param) from exc
    except Invalid as exc:  # bad content, found where it could be (a document's references)
        raise BadRequest(str(exc), param=exc.param) from exc


def _service(request: Request) -> MemoryService:
    service = getattr(request.app.state, "memory_service", None)
    if service is not None:
        return service
    state = request.app.state.proxy
    if not isinstance(state.memory, Remember):
        raise ServiceUnavailable(
            "memory is switched off in this proxy ([memory] enabled = false); "
            "the memory API needs it on"
        )
    return MemoryService.of(state.memory, state.max_body_bytes)


def _owner(identity: Identity, requested: str | None) -> str | None:
    """Whose scopes names refer to: the caller's, or (admins only) the one asked for."""
    if requested is None or requested == identity.owner:
        return identity.owner
    return requested if identity.admin else None


def _parse(model: type[M], raw: bytes) -> M:
    return _model(model, _json(raw), "body")


def _render(data: Any) -> bytes:
    try:
        return json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:  # a NaN or infinity stored by an older version: shown as null
        return json.dumps(finite_only(data), ensure_ascii=False, allow_nan=False).encode()


def _model(model: type[M], data: Any, where: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A field of several types fails once per member, each error's loc ending in
        # the member's tag ("float", "str"): grouped by field, one message for each.
        problems: dict[tuple[str | int, ...], list[str]] = {}
        for error in exc.errors():
            problems.setdefault(_field_path(model, error["loc"]), []).append(error["msg"])
        path, messages = next(iter(problems.items()))
        field = ".".join(str(part) for part in path)
        param = field or None
        message = _one_message(messages)
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        if exc.errors()[0]["type"] == SCOPE_ERROR:  # worded as a path's or header's is
            raise InvalidScopeName(f"{message}{more}", param=param) from exc
        name = f"{where} field {field!r}" if field else f"the {where}"
        raise BadRequest(f"{name}: {message}{more}", param=param) from exc


def _field_path(model: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The part of a pydantic error's `loc` that names fields and items, without the
    union member tags pydantic adds after a field of several types."""
    path: list[str | int] = []
    kind: Any = model
    for part in loc:
        kind = _unwrapped(kind)
        origin = get_origin(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            path.append(part)
            field = kind.model_fields.get(str(part))
            if field is None:  # a key the model does not have
                break
            kind = field.annotation
        elif origin in (list, tuple, set, frozenset, dict):
            path.append(part)
            kind = get_args(kind)[-1] if get_args(kind) else Any
        else:  # a scalar, or a union of several types: what follows is a member's tag
            break
    return tuple(path)


def _unwrapped(kind: Any) -> Any:
    """`kind` without Annotated's metadata and without None as a union member."""
    while True:
        if get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
            continue
        if get_origin(kind) in (Union, UnionType):
            members = [m for m in get_args(kind) if m is not type(None)]
            if len(members) == 1:  # Optional: validated as the one type, no tag
                kind = members[0]
                continue
        return kind


def _one_message(messages: list[str]) -> str:
    """One message for a field that failed as each member of a union ("Input should
    be a valid number or a valid string")."""
    messages = list(dict.fromkeys(messages))
    lead = "Input should be "
    if len(messages) > 1 and all(m.startswith(lead) for m in messages):
        return lead + " or ".join(m.removeprefix(lead) for m in messages)
    return "; or ".join(messages)


def _json(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRequest("the request body is empty; expected a JSON object")

    try:
        data = loads_finite(raw)
        # Lone surrogates ("\ud800") decode fine but cannot be stored as UTF-8.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    return data


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the {limit}-byte limit"
            " ([server] max_body_bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body exceeds the {limit}-byte limit ([server] max_body_bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def choices(value: str | None, allowed: tuple[str, ...], param: str) -> tuple[str, ...] | None:
    """A comma-separated list of `allowed` words (None when not given)."""
    if value is None or not value.strip():
        return None
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise BadRequest(f"{param} must be among {', '.join(allowed)}; got {value!r}", param=param)
    return chosen
