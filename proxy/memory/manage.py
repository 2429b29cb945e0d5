"""Seeing and steering a scope's memory by hand: the operations behind /memory and the CLI.

Plain functions ``fn(conn, ...)`` to run through ``Store.read`` / ``Store.write`` (and
``search`` over a Store, and the lifespan's ``Housekeeping``), returning
JSON-ready dicts that the HTTP routes send as they are and the CLI prints. Like
``proxy.memory.records``, every function is confined to the ``scope_id`` it is given:
the caller resolved that scope for its owner first.

Three errors, each with a message fit for the user (``proxy.memory.errors``):
``Invalid`` (the input is wrong: 400 over HTTP, naming the field), ``Missing`` (the
thing asked for is not there: 404) and ``Refused`` (it is there, but its state forbids
the change: 409). Clearing what a scope has none of (its summary, style sample or
scene) is no error: it is already as asked.

Per-scope settings live in ``scopes.settings`` (JSON): ``enabled`` (memory on/off),
``style`` (style sample on/off), ``llm`` (background summaries, facts and insights
on/off), ``scene`` (see ``SCENE_KEYS``) and
``style_history`` (earlier style samples, newest first; the style table keeps one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from proxy.memory import jobs, records, scope_state
from proxy.memory.db import Connection
from proxy.memory.embed import CachedEmbedder
from proxy.memory.errors import Invalid, Missing, Refused
from proxy.memory.facts import restore_superseded
from proxy.memory.rank import Weights, rank
from proxy.memory.recall import find_candidates
from proxy.memory.record import EMBED_JOB
from proxy.memory.records import MemoryRow, ScopeRow
from proxy.memory.store import Store

log = logging.getLogger("mnemoproxy.manage")

SETTING_KEYS = ("enabled", "style", "llm")
SCENE_KEYS = ("character", "location", "user", "char_name", "user_name")
MEMORY_STATES = ("active", "retracted", "superseded")
STYLE_HISTORY_KEEP = 20


# -- scopes -----------------------------------------------------------------------


def create_scope(
    conn: Connection, owner: str, name: str, label: str | None, now: float
) -> dict[str, Any]:
    """Create an empty scope; Refused if the owner already has one of that name."""
    if records.get_scope(conn, owner, name) is not None:
        raise Refused(f"a scope named {name!r} already exists")
    return scope_view(conn, records.get_or_create_scope(conn, owner, name, label, now))


def scope_views(conn: Connection, owner: str | None) -> list[dict[str, Any]]:
    """Every scope of ``owner`` (None: of everyone), most recently seen first."""
    scopes = [listing.scope for listing in records.list_scopes(conn, owner)]
    counts = _counts(conn, [s.id for s in scopes])
    return [_scope_view(s, counts.get(s.id, {})) for s in scopes]


def scope_view(conn: Connection, scope: ScopeRow) -> dict[str, Any]:
    """One scope with its counts, settings and scene."""
    return _scope_view(scope, _counts(conn, [scope.id]).get(scope.id, {}))


def _counts(conn: Connection, scope_ids: list[int]) -> dict[int, dict[str, int]]:
    """Per scope: messages and memories by state, pinned memories, chats, jobs."""
    counts: dict[int, dict[str, int]] = {i: {} for i in scope_ids}
    queries = (
        ("messages", "SELECT scope_id, 'messages_' || state, count(*) FROM messages"),
        ("threads", "SELECT scope_id, 'threads', count(DISTINCT thread) FROM messages"),
        ("memories", "SELECT scope_id, 'memories_' || state, count(*) FROM memories"),
        ("pinned", "SELECT scope_id, 'pinned', count(*) FROM memories"),
        ("jobs", "SELECT scope_id, 'jobs_' || state, count(*) FROM jobs"),
    )
    for chunk in records.chunked(scope_ids):
        marks = records.placeholders(chunk)
        for name, select in queries:
            where = f" WHERE scope_id IN ({marks})"
            if name == "pinned":
                where += " AND pinned = 1 AND state = 'active'"
            group = " GROUP BY scope_id" if name in ("threads", "pinned") else " GROUP BY 1, 2"
            for scope_id, key, n in conn.execute(select + where + group, chunk):
                counts[scope_id][key] = n
    return counts


def _scope_view(scope: ScopeRow, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "name": scope.name,
        "label": scope.label,
        "owner": scope.owner,
        "created_at": scope.created_at,
        "last_seen": scope.last_seen,
        "settings": settings_view(scope.settings),
        "scene": scene_view(scope.settings),
        "messages": {s: counts.get(f"messages_{s}", 0) for s in ("active", "partial", "undone")},
        "threads": counts.get("threads", 0),
        "memories": {
            **{s: counts.get(f"memories_{s}", 0) for s in MEMORY_STATES},
            "pinned": counts.get("pinned", 0),
        },
        "jobs": {s: counts.get(f"jobs_{s}", 0) for s in ("pending", "running", "failed")},
    }


def rename_scope(conn: Connection, scope_id: int, name: str | None, label: str | None) -> ScopeRow:
    """Give a scope a new name and/or label; Refused if the name is taken."""
    try:
        found = records.rename_scope(conn, scope_id, name=name, label=label)
    except records.ScopeNameTaken as exc:
        raise Refused(str(exc)) from exc
    row = records.get_scope_by_id(conn, None, scope_id)
    if not found or row is None:
        raise Missing("the scope no longer exists")
    return row


def delete_scope(conn: Connection, scope_id: int) -> None:
    """Delete a scope with everything in it."""
    if not records.delete_scope(conn, scope_id):
        raise Missing("the scope no longer exists")


def has_messages(conn: Connection, scope_id: int) -> bool:
    """Whether the scope's transcript has any message (in any state)."""
    row = conn.execute("SELECT 1 FROM messages WHERE scope_id = ? LIMIT 1", (scope_id,))
    return row.fetchone() is not None


# -- settings and scene -------------------------------------------------------------


def settings_view(settings: dict[str, Any]) -> dict[str, bool]:
    """The switches of a scope, with their defaults (all on)."""
    return {key: settings.get(key) is not False for key in SETTING_KEYS}


def update_settings(conn: Connection, scope_id: int, changes: dict[str, bool]) -> dict[str, bool]:
    """Set some of the switches (``enabled``, ``style``, ``llm``); return them all."""
    unknown = set(changes) - set(SETTING_KEYS)
    if unknown:
        raise Invalid(
            f"unknown settings {sorted(unknown)}; known: {list(SETTING_KEYS)}",
            param=min(unknown),
        )
    return settings_view(records.update_scope_settings(conn, scope_id, dict(changes)))


def scene_view(settings: dict[str, Any]) -> dict[str, str]:
    """The scope's scene: only the keys that are set."""
    scene = settings.get("scene") or {}
    return {k: scene[k] for k in SCENE_KEYS if isinstance(scene.get(k), str) and scene[k]}


def set_scene(
    conn: Connection, scope_id: int, values: dict[str, str | None], *, replace: bool
) -> dict[str, str]:
    """Replace the scene, or merge ``values`` into it (None or "" removes a key)."""
    unknown = set(values) - set(SCENE_KEYS)
    if unknown:
        raise Invalid(
            f"unknown scene keys {sorted(unknown)}; known: {list(SCENE_KEYS)}",
            param=min(unknown),
        )
    current = {} if replace else scene_view(_settings(conn, scope_id))
    for key, value in values.items():
        if value is None or not value.strip():
            current.pop(key, None)
        else:
            current[key] = value.strip()
    records.update_scope_settings(conn, scope_id, {"scene": current or None})
    return scene_view({"scene": current})


def _settings(conn: Connection, scope_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT settings FROM scopes WHERE id = ?", (scope_id,)).fetchone()
    if row is None:
        raise Missing("the scope no longer exists")
    return json.loads(row[0])


# -- transcript ---------------------------------------------------------------------

_TRANSCRIPT_COLS = (
    "id, seq, thread, role, speaker, content, state, seen_at, request_id, undone_at, private, raw"
)


def transcript(
    conn: Connection,
    scope_id: int,
    *,
    states: Iterable[str] = ("active", "partial", "undone"),
    thread: int | None = None,
    after_seq: int | None = None,
    limit: int = 200,
    raw: bool = False,
) -> dict[str, Any]:
    """The scope's messages as stored, in order, with their state and chat (thread).

    A private message (``X-Memory-Write: off``) shows as a placeholder: ``private``
    true, empty content (the store has no more). Page with ``after_seq`` (the
    ``next_after`` of the previous page).
    """
    states = list(states)
    where = [f"scope_id = ? AND state IN ({records.placeholders(states)})"]
    params: list[Any] = [scope_id, *states]
    if thread is not None:
        where.append("thread = ?")
        params.append(thread)
    if after_seq is not None:
        where.append("seq > ?")
        params.append(after_seq)
    rows = conn.execute(
        f"SELECT {_TRANSCRIPT_COLS} FROM messages WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    messages = []
    for r in rows:
        view = dict(zip(_TRANSCRIPT_COLS.split(", ")[:-1], r[:-1], strict=True))
        view["private"] = bool(view["private"])
        if raw:
            view["raw"] = json.loads(r[-1])
        messages.append(view)
    return {"messages": messages, "next_after": rows[-1][1] if more else None}


# -- memories -----------------------------------------------------------------------


def memory_view(row: MemoryRow) -> dict[str, Any]:
    """A memory as the API shows it."""
    view = dataclasses.asdict(row)
    view.pop("scope_id")
    view["sources"] = list(row.sources)
    return view


def list_memories(
    conn: Connection,
    scope_id: int,
    *,
    kinds: Iterable[str] | None = None,
    states: Iterable[str] = ("active",),
    since: float | None = None,
    pinned: bool | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """The scope's memories, newest first; page with ``before_id`` (``next_before``)."""
    rows = records.list_memories(
        conn,
        scope_id,
        kinds=kinds,
        states=states,
        pinned=pinned,
        before_id=before_id,
        since=since,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "memories": [memory_view(r) for r in rows],
        "next_before": rows[-1].id if more else None,
    }


def get_memory(conn: Connection, scope_id: int, memory_id: int) -> dict[str, Any]:
    """One memory of the scope, in any state."""
    return memory_view(_memory(conn, scope_id, memory_id))


def _memory(conn: Connection, scope_id: int, memory_id: int) -> MemoryRow:
    row = records.get_memory(conn, scope_id, memory_id)
    if row is None:
        raise Missing(f"no memory {memory_id} in this scope")
    return row


def add_note(
    conn: Connection,
    scope_id: int,
    text: str,
    *,
    now: float,
    importance: float = 0.5,
    pinned: bool = False,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add a note by hand (pinned: shown on every turn) and queue its embedding."""
    text = text.strip()
    if not text:
        raise Invalid("a note needs some text", param="text")
    (memory_id,) = records.insert_memories(
        conn,
        [
            records.NewMemory(
                scope_id=scope_id,
                kind="note",
                text=text,
                at=now,
                importance=importance,
                pinned=pinned,
                meta=meta or {"source": "manual"},
            )
        ],
        now,
    )
    jobs.enqueue(conn, EMBED_JOB, {"memory_ids": [memory_id]}, scope_id, now)
    return get_memory(conn, scope_id, memory_id)


def edit_memory(
    conn: Connection,
    scope_id: int,
    memory_id: int,
    *,
    now: float,
    text: str | None = None,
    importance: float | None = None,
    pinned: bool | None = None,
) -> dict[str, Any]:
    """Change a memory's text (it is embedded again), importance or pin.

    Refused for a memory that is no longer active: it was retracted because its
    messages were undone, or superseded by a newer one; change that one instead.
    """
    row = _memory(conn, scope_id, memory_id)
    if row.state != "active":
        reason = (
            "retracted: the messages it came from were undone"
            if row.state == "retracted"
            else f"superseded by memory {row.superseded_by}"
        )
        raise Refused(
            f"memory {memory_id} is {reason}; it cannot be changed. "
            "Add a note instead, or delete it."
        )
    if text is not None:
        text = text.strip()
        if not text:
            raise Invalid("a memory's text cannot be empty", param="text")
        if text != row.text:
            records.update_memory_text(conn, scope_id, memory_id, text)
            jobs.enqueue(conn, EMBED_JOB, {"memory_ids": [memory_id]}, scope_id, now)
    if importance is not None:
        conn.execute(
            "UPDATE memories SET importance = ? WHERE id = ? AND scope_id = ?",
            (importance, memory_id, scope_id),
        )
    if pinned is not None:
        records.set_pinned(conn, scope_id, memory_id, pinned)
    return get_memory(conn, scope_id, memory_id)


def delete_memory(conn: Connection, scope_id: int, memory_id: int) -> None:
    """Delete a memory for good (any state). The facts it superseded are active again
    (else they would stay superseded by nothing: never recalled, never editable)."""
    restore_superseded(conn, scope_id, [memory_id], time.time())
    if not records.delete_memory(conn, scope_id, memory_id):
        raise Missing(f"no memory {memory_id} in this scope")


async def search(
    store: Store,
    scope_id: int,
    query: str,
    *,
    embedder: CachedEmbedder | None,
    weights: Weights,
    candidates: int,
    limit: int,
    now: float | None = None,
) -> dict[str, Any]:
    """The memories recall would pick for ``query``, best first, with their scores.

    The same hybrid recall as a chat request (vector + keyword candidates, one score);
    keyword only while the embedding model is not ready. Pinned memories are not
    candidates: they are always shown.
    """
    if not query.strip():  # its vector would match everything a little
        raise Invalid("q: a search needs something to look for, not only whitespace", param="q")
    now = time.time() if now is None else now
    vector = None
    mode = "keyword"
    if embedder is not None and embedder.ready:
        vector = await embedder.embed_query(query)
        mode = "hybrid"
    found = await store.read(find_candidates, scope_id, vector, query, candidates)
    by_id = {c.memory_id: c for c in found}
    chosen = rank(found, now=now, weights=weights, exclude_sources=set(), limit=limit)
    results = []
    for m in chosen:
        c = by_id[m.memory_id]
        results.append(
            {
                "id": m.memory_id,
                "kind": m.kind,
                "text": m.text,
                "at": m.at,
                "speaker": m.speaker,
                "role": m.role,
                "sources": list(m.source_ids),
                "score": round(m.score, 4),
                "components": {k: round(v, 4) for k, v in m.components.items()},
                "vector_similarity": c.vector_sim,
                "keyword_rank": c.bm25_rank,
            }
        )
    return {"query": query, "mode": mode, "results": results}


# -- summary and style --------------------------------------------------------------


def summary_view(row: scope_state.SummaryRow) -> dict[str, Any]:
    """A summary version as the API shows it."""
    view = dataclasses.asdict(row)
    view.pop("scope_id")
    return view


def get_summary(conn: Connection, scope_id: int) -> dict[str, Any]:
    """``{"summary": the active summary or None}``."""
    row = scope_state.current_summary(conn, scope_id)
    return {"summary": summary_view(row) if row else None}


def set_summary(
    conn: Connection,
    scope_id: int,
    text: str,
    *,
    now: float,
    covers_until_seq: int | None = None,
) -> dict[str, Any]:
    """Replace the rolling summary by hand (the old one stays in the history).

    By default the new text covers what the old one did, or, with none, the whole
    transcript so far.
    """
    text = text.strip()
    if not text:
        raise Invalid("a summary needs some text; to remove it, clear it", param="text")
    last = conn.execute(
        "SELECT coalesce(max(seq), 0) FROM messages WHERE scope_id = ?", (scope_id,)
    ).fetchone()[0]
    if covers_until_seq is None:
        current = scope_state.current_summary(conn, scope_id)
        covers_until_seq = current.covers_until_seq if current is not None else last
    elif covers_until_seq > last:
        # Past the transcript, no message would ever be left to summarize after it.
        raise Invalid(
            f"covers_until_seq {covers_until_seq} is past the last message ({last})",
            param="covers_until_seq",
        )
    scope_state.save_summary(conn, scope_id, text, covers_until_seq, now, {"source": "manual"})
    return get_summary(conn, scope_id)


def clear_summary(conn: Connection, scope_id: int) -> bool:
    """Retract the active summary, leaving none (it stays in the history); False when
    there was none (the scope is then already as asked: no error)."""
    changed = conn.execute(
        "UPDATE summaries SET state = 'retracted' WHERE scope_id = ? AND state = 'active'",
        (scope_id,),
    ).rowcount
    return bool(changed)


def summary_history(conn: Connection, scope_id: int, limit: int = 50) -> dict[str, Any]:
    """Every version of the summary, newest first, with its state."""
    rows = scope_state.list_summaries(conn, scope_id, limit)
    return {"summaries": [summary_view(r) for r in rows]}


def style_view(row: scope_state.StyleRow, settings: dict[str, Any]) -> dict[str, Any]:
    """The style sample as the API shows it; ``enabled``: whether it is shown at all."""
    return {
        "text": row.text,
        "source": row.source,
        "message_id": row.message_id,
        "updated_at": row.updated_at,
        "enabled": row.enabled and settings.get("style") is not False,
    }


def get_style(conn: Connection, scope_id: int) -> dict[str, Any]:
    """``{"style": the style sample or None}``."""
    row = scope_state.get_style(conn, scope_id)
    return {"style": style_view(row, _settings(conn, scope_id)) if row else None}


def set_style(conn: Connection, scope_id: int, text: str, *, now: float) -> dict[str, Any]:
    """Replace the style sample by hand (automatic capture never overrides it)."""
    text = text.strip()
    if not text:
        raise Invalid("a style sample needs some text; to remove it, clear it", param="text")
    _remember_style(conn, scope_id, now)
    scope_state.set_style(conn, scope_id, text, "manual", now)
    return get_style(conn, scope_id)


def clear_style(conn: Connection, scope_id: int, *, now: float) -> bool:
    """Remove the style sample (it stays in the history); False when there was none
    (no error: the scope is already as asked). The next reply in the scope may capture
    a new one automatically; turn ``style`` off to have none."""
    if not _remember_style(conn, scope_id, now):
        return False
    conn.execute("DELETE FROM style WHERE scope_id = ?", (scope_id,))
    return True


def style_history(conn: Connection, scope_id: int) -> dict[str, Any]:
    """Earlier style samples, newest first."""
    return {"history": list(_settings(conn, scope_id).get("style_history") or [])}


def _remember_style(conn: Connection, scope_id: int, now: float) -> bool:
    """Put the current sample at the head of the history; False if there is none."""
    row = scope_state.get_style(conn, scope_id)
    if row is None:
        return False
    entry = {
        "text": row.text,
        "source": row.source,
        "updated_at": row.updated_at,
        "replaced_at": now,
    }
    history = [entry, *(_settings(conn, scope_id).get("style_history") or [])]
    records.update_scope_settings(conn, scope_id, {"style_history": history[:STYLE_HISTORY_KEEP]})
    return True


# -- request log ----------------------------------------------------------------------


def request_item(row: jobs.RequestRow) -> dict[str, Any]:
    """A request log entry in brief, for lists."""
    detail = row.detail
    tokens = detail.get("tokens") or {}
    return {
        "id": row.id,
        "created_at": row.created_at,
        "model": detail.get("model"),
        "upstream": detail.get("upstream"),
        "alignment": detail.get("alignment"),
        "tokens_in": tokens.get("original"),
        "tokens_sent": tokens.get("sent"),
        "tokens_saved": tokens.get("saved"),
        "injected": len(detail.get("injected") or []),
        "trimmed": len(detail.get("trimmed") or []),
        "errors": list(detail.get("errors") or []),
    }


def list_requests(
    conn: Connection,
    scope_id: int,
    *,
    before: float | jobs.LogPosition | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """The scope's logged requests, newest first. Page with ``before``: the position of
    ``next_cursor`` (`parse_request_cursor`), or a created_at (``next_before``: kept for
    older clients, it skips entries logged at the same time as the page's last)."""
    rows = jobs.list_requests(conn, scope_id, before=before, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "requests": [request_item(r) for r in rows],
        "next_cursor": request_cursor(rows[-1].position) if more else None,
        "next_before": rows[-1].created_at if more else None,
    }


def request_cursor(position: jobs.LogPosition) -> str:
    """The request log's paging cursor after ``position``: its created_at and rowid, so
    that entries logged at the same time are each reached once."""
    return f"{position.created_at!r}:{position.rowid}"


def parse_request_cursor(cursor: str) -> jobs.LogPosition:
    """The position a `request_cursor` names; `Invalid` (of ``cursor``) when it names
    none."""
    created_at, _, rowid = cursor.partition(":")
    # float() and int() raise ValueError for what is no number: here that is the
    # caller's input, said as `Invalid` below.
    with contextlib.suppress(ValueError):
        if "_" in cursor:  # float() and int() take "1_000": no cursor we give out has one
            raise ValueError(cursor)
        position = jobs.LogPosition(float(created_at), int(rowid))
        # Within SQLite's integers: a larger rowid failed in the query, as a 500.
        if 0 <= position.created_at < math.inf and 0 <= position.rowid < 2**63:
            return position
    raise Invalid(
        f"not a cursor of the request log: {cursor!r} (pass next_cursor back)", param="cursor"
    )


def get_request(conn: Connection, owner: str | None, request_id: str) -> dict[str, Any]:
    """One logged request of ``owner``'s scopes (None: anyone's), in full."""
    row = jobs.get_request(conn, owner, request_id)
    if row is None:
        raise Missing(f"no logged request {request_id!r}")
    scope = conn.execute("SELECT name, owner FROM scopes WHERE id = ?", (row.scope_id,)).fetchone()
    return {
        **request_item(row),
        "scope": scope[0] if scope else None,
        "owner": scope[1] if scope else None,
        "detail": row.detail,
    }


# -- job queue ------------------------------------------------------------------------


def job_counts(conn: Connection) -> dict[str, int]:
    """Jobs waiting, running, and failed for good (all scopes), for /metrics."""
    counts = dict.fromkeys(("pending", "running", "failed"), 0)
    for state, n in conn.execute(
        "SELECT state, count(*) FROM jobs WHERE state IN ('pending', 'running', 'failed')"
        " GROUP BY state"
    ):
        counts[state] = n
    return counts


class Housekeeping:
    """Upkeep the app's lifespan owns: the job counts /metrics shows (refreshed every
    few seconds, so that a scrape never waits on the database) and the request log's
    retention (pruned at start, then hourly)."""

    def __init__(
        self,
        store: Store,
        *,
        keep_days: float,
        keep_per_scope: int,
        every: float = 5.0,
        prune_every: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keep_days = keep_days
        self.keep_per_scope = keep_per_scope
        self.every = every
        self.prune_every = prune_every
        self.clock = clock
        self.jobs = dict.fromkeys(("pending", "running", "failed"), 0)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Callable[[], Awaitable[None]]:
        """Prune the request log and count the jobs once, then start the loop; returns
        `stop`."""
        try:
            await self.prune()
            await self.refresh()
        except Exception:  # upkeep must never keep the proxy from starting
            log.exception("housekeeping failed at start; trying again later")
        self._task = asyncio.create_task(self._run(), name="mnemoproxy-housekeeping")
        return self.stop

    async def stop(self) -> None:
        """Stop the loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Read the job counts now."""
        self.jobs = await self.store.read(job_counts)

    async def prune(self) -> int:
        """Apply the request log's retention now; return how many entries went."""
        deleted = await self.store.write(
            jobs.prune_requests, self.keep_days, self.keep_per_scope, self.clock()
        )
        if deleted:
            log.info("request log: pruned %d old entries", deleted)
        return deleted

    async def _run(self) -> None:
        next_prune = self.clock() + self.prune_every
        while True:
            await asyncio.sleep(self.every)
            try:
                if self.clock() >= next_prune:
                    next_prune = self.clock() + self.prune_every
                    await self.prune()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # upkeep must never take the proxy down
                log.exception("housekeeping failed; trying again later")
