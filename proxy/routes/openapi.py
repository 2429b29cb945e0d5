"""The contract of the memory API: its request and response shapes, and the OpenAPI
document built from them and from the table of operations in `memory_api`.

Request models validate what comes in (a 400 naming the field otherwise); response
models only describe what goes out (the handlers return plain dicts from
`proxy.memory.manage`), and the schemathesis test holds the two to each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictStr,
    WithJsonSchema,
)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from proxy.memory.records import MAX_DATE, MEMORY_KINDS
from proxy.memory.scope import MAX_SCOPE_LEN, InvalidScope, validate_scope_name

# A scope name (see proxy.memory.scope.validate_scope_name) as a regex without
# look-ahead: runs of allowed characters joined by single dots.
SCOPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_:-]*(?:\.[A-Za-z0-9_:-]+)*\.?$"
# The type of a pydantic error for a bad scope name (answered as `InvalidScopeName`).
SCOPE_ERROR = "invalid_scope"
MAX_ID = 2**53  # ids and cursors beyond this are nobody's (and JSON-safe)
MAX_TEXT = 200_000

Kind = Literal["turn", "fact", "summary", "insight", "note"]
assert set(MEMORY_KINDS) == set(Kind.__args__)  # type: ignore[attr-defined]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Out(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)


def _scope_name(value: str) -> str:
    # Checked as a path's or a header's scope is, for the same plain message: the
    # pattern (kept in the schema, for clients) would be shown as a regex.
    try:
        return validate_scope_name(value)
    except InvalidScope as exc:
        raise PydanticCustomError(SCOPE_ERROR, str(exc)) from None


ScopeName = Annotated[
    str,
    AfterValidator(_scope_name),
    WithJsonSchema({"type": "string", "pattern": SCOPE_PATTERN, "maxLength": MAX_SCOPE_LEN}),
]


# -- query parameters ------------------------------------------------------------------


class OwnerQuery(_In):
    owner: str | None = Field(
        None,
        max_length=64,
        description="Admin keys only: the owner (key hash) whose scope is meant.",
    )


class TranscriptQuery(OwnerQuery):
    state: str | None = Field(
        None, description="Comma-separated states to show (active, partial, undone); default all."
    )
    thread: int | None = Field(None, ge=0, le=MAX_ID, description="Only this chat.")
    after: int | None = Field(None, ge=0, le=MAX_ID, description="Page: messages after this seq.")
    limit: int = Field(200, ge=1, le=1000)
    raw: bool = Field(False, description="Include each message as the app sent it.")


class MemoriesQuery(OwnerQuery):
    kind: str | None = Field(None, description="Comma-separated kinds: " + ", ".join(MEMORY_KINDS))
    state: str = Field(
        "active", description="Comma-separated states (active, retracted, superseded) or all."
    )
    since: str | None = Field(
        None, max_length=64, description="Dated at or after: unix seconds or ISO 8601."
    )
    pinned: bool | None = None
    before: int | None = Field(None, ge=0, le=MAX_ID, description="Page: ids below this.")
    limit: int = Field(100, ge=1, le=1000)


class SearchQuery(OwnerQuery):
    q: str = Field(min_length=1, max_length=4000, description="What to look for.")
    limit: int = Field(10, ge=1, le=200)
    min_score: float | None = Field(
        None, ge=0, le=100, description="Default: the configured [recall] min_score."
    )


class RequestsQuery(OwnerQuery):
    cursor: str | None = Field(
        None,
        max_length=64,
        description="Page: the entries after this one (a response's next_cursor). "
        "Use it rather than before, which skips entries logged at the same time.",
    )
    before: float | None = Field(
        None,
        ge=0,
        le=MAX_DATE,
        description="Page: logged before this time (unix seconds). Superseded by cursor.",
    )
    limit: int = Field(50, ge=1, le=500)


class ImportQuery(OwnerQuery):
    append: bool = Field(False, description="Allow importing into a scope that has messages.")


class CardQuery(ImportQuery):
    filename: str | None = Field(None, max_length=255, description="Only named in messages.")


# -- request bodies ------------------------------------------------------------------


class ScopeCreate(_In):
    name: ScopeName
    label: str | None = Field(None, max_length=200)


class ScopePatch(_In):
    name: ScopeName | None = None
    label: str | None = Field(
        None, max_length=200, description="The shown name; null or empty removes it."
    )


class SettingsPatch(_In):
    enabled: bool | None = Field(None, strict=True, description="Memory on or off for this scope.")
    style: bool | None = Field(None, strict=True, description="Style sample on or off.")
    llm: bool | None = Field(
        None, strict=True, description="Background summaries, facts and insights on or off."
    )


class SceneIn(_In):
    character: str | None = Field(None, max_length=MAX_TEXT, description="Who the character is.")
    location: str | None = Field(None, max_length=MAX_TEXT, description="Where the scene is.")
    user: str | None = Field(None, max_length=MAX_TEXT, description="Who the user is.")
    char_name: str | None = Field(None, max_length=200, description="Overrides the detected name.")
    user_name: str | None = Field(None, max_length=200, description="Overrides the detected name.")


class NoteIn(_In):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    importance: float = Field(0.5, ge=0, le=1)
    pinned: bool = Field(False, strict=True, description="Pinned: shown on every turn.")


class MemoryPatch(_In):
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT)
    importance: float | None = Field(None, ge=0, le=1)
    pinned: bool | None = Field(None, strict=True)


class SummaryIn(_In):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    covers_until_seq: int | None = Field(None, ge=0, le=MAX_ID)


class StyleIn(_In):
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class ChatMessageIn(_In):
    role: Literal["user", "assistant", "system"]
    content: str = Field(max_length=MAX_TEXT)
    name: str | None = Field(None, max_length=200)
    # Strict: lax, `true` was read as 1.0, the first second of 1970.
    date: StrictFloat | StrictStr | None = Field(
        None, description="When it was said: unix seconds or an ISO 8601 date."
    )


class TranscriptAppend(_In):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1000)
    thread: int | None = Field(
        None, ge=0, le=MAX_ID, description="Continue this chat (the first batch's thread)."
    )
    append: bool = Field(
        False, strict=True, description="Allow a new chat in a scope that has messages."
    )
    char_name: str | None = Field(None, max_length=200)
    user_name: str | None = Field(None, max_length=200)


# -- the scope document (request and response) -----------------------------------------


class DocStyleEntry(_In):
    text: str
    source: Literal["auto", "manual"] = "manual"
    updated_at: float | None = Field(None, ge=0, le=MAX_DATE)
    replaced_at: float | None = Field(None, ge=0, le=MAX_DATE)


class DocSettings(_In):
    # A key this version does not know means nothing to it: dropped, not refused.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    enabled: bool | None = Field(None, strict=True)  # not "no" or 0: what was meant?
    style: bool | None = Field(None, strict=True)
    llm: bool | None = Field(None, strict=True)
    scene: SceneIn | None = None
    style_history: list[DocStyleEntry] | None = None


class DocScope(_In):
    name: str | None = None
    label: str | None = None
    created_at: float | None = Field(None, ge=0, le=MAX_DATE)
    last_seen: float | None = Field(None, ge=0, le=MAX_DATE)
    settings: DocSettings = DocSettings()


class DocMessage(_In):
    seq: int | None = Field(None, ge=1, le=MAX_ID)
    thread: int = Field(0, ge=0, le=MAX_ID)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    speaker: str | None = None
    content: str
    raw: dict[str, Any] | None = None
    fingerprint: str | None = None
    seen_at: float | None = Field(None, ge=0, le=MAX_DATE)
    state: Literal["active", "partial", "undone"] = "active"
    request_id: str | None = None
    undone_at: float | None = Field(None, ge=0, le=MAX_DATE)
    private: bool = Field(
        False,
        strict=True,
        description="Of an X-Memory-Write: off exchange: kept without its text (content, "
        "raw and speaker are ignored), known by its fingerprint, which it needs.",
    )


class DocMemory(_In):
    ref: int | None = Field(None, ge=1, le=MAX_ID)
    kind: Kind
    text: str = Field(min_length=1, max_length=MAX_TEXT, pattern=r"\S")
    importance: float = Field(0.5, ge=0, le=1)
    at: float | None = Field(None, ge=0, le=MAX_DATE)
    created_at: float | None = Field(None, ge=0, le=MAX_DATE)
    state: Literal["active", "retracted", "superseded"] = "active"
    superseded_by: int | None = Field(None, ge=1, le=MAX_ID)
    pinned: bool = Field(False, strict=True)
    speaker: str | None = None
    role: str | None = None
    meta: dict[str, Any] = {}
    sources: list[int] = Field([], description="seq of the messages it came from")


class DocSummary(_In):
    text: str
    created_at: float | None = Field(None, ge=0, le=MAX_DATE)
    covers_until_seq: int = Field(0, ge=0, le=MAX_ID)
    state: Literal["active", "archived", "retracted"] = "active"
    meta: dict[str, Any] = {}


class DocStyle(_In):
    text: str
    message_seq: int | None = Field(None, ge=1, le=MAX_ID)
    source: Literal["auto", "manual"] = "manual"
    enabled: bool = True
    updated_at: float | None = Field(None, ge=0, le=MAX_DATE)


class ScopeDocument(_In):
    """A whole scope: export it from one proxy, import it into another."""

    format: Literal["mnemoproxy.scope"] = "mnemoproxy.scope"
    version: Literal[1] = 1
    scope: DocScope = DocScope()
    messages: list[DocMessage] = []
    memories: list[DocMemory] = []
    summaries: list[DocSummary] = []
    style: DocStyle | None = None


# -- responses ----------------------------------------------------------------------------


class Switches(_Out):
    enabled: bool
    style: bool
    llm: bool


class Scene(_Out):
    character: str | None = None
    location: str | None = None
    user: str | None = None
    char_name: str | None = None
    user_name: str | None = None


class MessageCounts(_Out):
    active: int
    partial: int
    undone: int


class MemoryCounts(_Out):
    active: int
    retracted: int
    superseded: int
    pinned: int


class JobCounts(_Out):
    pending: int
    running: int
    failed: int


class ScopeOut(_Out):
    name: str
    label: str | None
    owner: str
    created_at: float
    last_seen: float
    settings: Switches
    scene: Scene
    messages: MessageCounts
    threads: int
    memories: MemoryCounts
    jobs: JobCounts


class ScopeList(_Out):
    scopes: list[ScopeOut]


class MessageOut(_Out):
    id: int
    seq: int
    thread: int
    role: str
    speaker: str | None
    content: str
    state: Literal["active", "partial", "undone"]
    seen_at: float
    request_id: str | None
    undone_at: float | None
    private: bool = Field(
        description="Of an X-Memory-Write: off exchange: stored without its text (content "
        "is empty), only so that the app's next requests are recognised."
    )
    raw: dict[str, Any] | None = None


class Transcript(_Out):
    messages: list[MessageOut]
    next_after: int | None


class AppendResult(_Out):
    thread: int
    messages: int
    memories: int


class MemoryOut(_Out):
    id: int
    kind: Kind
    text: str
    importance: float
    at: float
    created_at: float
    state: Literal["active", "retracted", "superseded"]
    superseded_by: int | None
    pinned: bool
    speaker: str | None
    role: str | None
    embedded: bool
    meta: dict[str, Any]
    sources: list[int]


class MemoryList(_Out):
    memories: list[MemoryOut]
    next_before: int | None


class SearchHit(_Out):
    id: int
    kind: Kind
    text: str
    at: float
    speaker: str | None
    role: str | None
    sources: list[int]
    score: float
    components: dict[str, float]
    vector_similarity: float | None
    keyword_rank: int | None


class SearchResult(_Out):
    query: str
    mode: Literal["hybrid", "keyword"]
    results: list[SearchHit]


class SummaryOut(_Out):
    id: int
    text: str
    created_at: float
    covers_until_seq: int
    state: Literal["active", "archived", "retracted"]
    meta: dict[str, Any]


class SummaryCurrent(_Out):
    summary: SummaryOut | None


class SummaryHistory(_Out):
    summaries: list[SummaryOut]


class StyleOut(_Out):
    text: str
    source: Literal["auto", "manual"]
    message_id: int | None
    updated_at: float
    enabled: bool


class StyleCurrent(_Out):
    style: StyleOut | None


class StyleEarlier(_Out):
    text: str
    source: str
    updated_at: float
    replaced_at: float


class StyleHistory(_Out):
    history: list[StyleEarlier]


class RequestItem(_Out):
    id: str
    created_at: float
    model: str | None
    upstream: str | None
    alignment: str | None
    tokens_in: int | None
    tokens_sent: int | None
    tokens_saved: int | None
    injected: int
    trimmed: int
    errors: list[str]


class RequestList(_Out):
    requests: list[RequestItem]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: none.")
    next_before: float | None = Field(description="The last entry's created_at (see cursor).")


class RequestOut(RequestItem):
    scope: str | None
    owner: str | None
    detail: dict[str, Any] = Field(
        description="What remember.py logged: messages sent, injected items (kind, score, "
        "components, source_ids), trimmed indices, tokens, timings, the reply."
    )


class ImportResult(_Out):
    messages: int
    memories: int
    summaries: int
    style: bool
    kept_existing: list[str]


class LineProblem(_Out):
    line: int
    message: str


class ChatImportResult(_Out):
    thread: int | None
    messages: int
    memories: int
    character_name: str | None
    user_name: str | None
    errors: list[LineProblem] = Field(description="Lines not imported (the rest was).")
    warnings: list[LineProblem]


class CardResult(_Out):
    name: str
    spec: str
    scene: Scene
    style_sample: bool
    notes: int
    pinned_notes: int
    warnings: list[str]


class ErrorBody(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(_Out):
    error: ErrorBody


# -- the document --------------------------------------------------------------------------

Handler = Callable[..., Awaitable[Any]]

ERROR_TEXT = {
    400: "Invalid input; the message names what is wrong.",
    401: "Missing or invalid API key.",
    404: "No such scope, memory or request for this key.",
    409: "The change conflicts with the current state.",
    413: "The body is too large.",
    503: "Memory is switched off in this proxy.",
    # Any operation may hit a bug: documented on all of them (see `_operation`).
    500: "Internal error (a bug): the message only points to the proxy's log.",
}


@dataclass(frozen=True)
class Operation:
    """One endpoint of the memory API: what it takes, what it answers, who answers."""

    method: str
    path: str  # relative to /memory, with {scope}, {memory_id}, {request_id}
    handler: Handler
    summary: str
    tag: str
    _: KW_ONLY
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    raw_body: tuple[str, ...] = ()  # media types of a raw upload (a file)
    response: type[BaseModel] | None = None  # None: 204 No Content
    status: int = 200
    done: str = "Done."  # what a 204 means
    errors: tuple[int, ...] = (400, 401, 404, 503)
    heavy: bool = False  # big documents: parse and render them off the event loop


PATH_PARAMS: dict[str, dict[str, Any]] = {
    "scope": {"type": "string", "pattern": SCOPE_PATTERN, "maxLength": 128},
    "memory_id": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    "request_id": {"type": "string", "minLength": 1, "maxLength": 128},
}


def openapi_document(operations: list[Operation], *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of `operations`, served at /memory/openapi.json."""
    uses: set[tuple[type[BaseModel], str]] = {(ErrorEnvelope, "serialization")}
    for op in operations:
        if op.body is not None:
            uses.add((op.body, "validation"))
        if op.response is not None:
            uses.add((op.response, "serialization"))
    refs, defs = models_json_schema(
        sorted(uses, key=lambda use: (use[0].__name__, use[1])),
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mnemoproxy memory API",
            "version": version,
            "description": "See and steer what the proxy remembers. A key sees its own "
            "scopes only (an admin key sees all); other keys' scopes answer 404.",
        },
        "servers": [{"url": "/memory"}],
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


def _operation(op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": schema}
        for name, schema in PATH_PARAMS.items()
        if f"{{{name}}}" in op.path
    ]
    if op.query is not None:
        schema = op.query.model_json_schema()
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": _query_schema(prop),
            }
            if "description" in prop:
                param["description"] = prop["description"]
            params.append(param)
    out: dict[str, Any] = {
        "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_')}".replace(
            "{", ""
        ).replace("}", ""),
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": params,
        "responses": {},
    }
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
        }
    elif op.raw_body:
        out["requestBody"] = {
            "required": True,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}} for media in op.raw_body
            },
        }
    if op.response is None:
        out["responses"][str(op.status)] = {"description": op.done}
    else:
        schema = refs[(op.response, "serialization")]
        out["responses"][str(op.status)] = {
            "description": "OK.",
            "content": {"application/json": {"schema": schema}},
        }
    error = {"application/json": {"schema": refs[(ErrorEnvelope, "serialization")]}}
    for status in (*op.errors, 500):
        out["responses"][str(status)] = {"description": ERROR_TEXT[status], "content": error}
    return out


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: an optional one is its non-null type (a query string
    has no null, only an absent parameter)."""
    schema = {k: v for k, v in prop.items() if k not in ("title", "description")}
    variants = [v for v in schema.pop("anyOf", ()) if v.get("type") != "null"]
    if len(variants) == 1:
        schema.update(variants[0])
    elif variants:
        schema["anyOf"] = variants
    if schema.get("default", 0) is None:
        del schema["default"]
    return schema
