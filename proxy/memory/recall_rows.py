"""The rows of memories that recall ranks, kept in memory between requests.

Every request loads the rows of its ~150 candidates, most of them the same memories as
the last request's (~0.5 ms of the request's wait at 10k memories, bench/memory.py).
The reader connections of a database share one cache of active rows. It is valid at
one position of the `memory_changes` log (migration 5: triggers log every memory whose
row or sources change); a reader whose snapshot is further on first drops the rows
logged since, and one whose snapshot is elsewhere reads SQLite as before. Only
read-only readers use it: a writer's snapshot may hold log entries a rollback undoes.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

from proxy.memory import records
from proxy.memory.db import Connection

# Rows kept per database (~0.5 KB each); past this the cache starts over.
MAX_ROWS = 50_000


class Row(NamedTuple):
    """What ranking needs of a memory."""

    id: int
    kind: str
    text: str
    at: float
    importance: float
    pinned: bool
    speaker: str | None
    role: str | None
    sources: tuple[int, ...]


class _Cache:
    """Active rows as of log position `seq`, by memory id, with their scope."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = -1  # no position yet: nothing cached
        self.rows: dict[int, tuple[int, Row]] = {}


_SHARED: weakref.WeakValueDictionary[str, _Cache] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def load_rows(conn: Connection, scope_id: int, memory_ids: Sequence[int]) -> dict[int, Row]:
    """The active memories of the scope among `memory_ids`, with their sources."""
    wanted = list(dict.fromkeys(memory_ids))
    cache = _cache_of(conn)
    seq = _catch_up(conn, cache) if cache is not None else None
    if cache is None or seq is None:
        return _select(conn, scope_id, wanted)
    found: dict[int, Row] = {}
    missing: list[int] = []
    with cache.lock:
        rows = cache.rows
        for memory_id in wanted:
            hit = rows.get(memory_id)
            if hit is not None and hit[0] == scope_id:
                found[memory_id] = hit[1]
            else:
                missing.append(memory_id)
    if missing:
        loaded = _select(conn, scope_id, missing)
        found.update(loaded)
        with cache.lock:
            if cache.seq == seq:  # else another reader moved it on meanwhile
                if len(cache.rows) + len(loaded) > MAX_ROWS:
                    cache.rows = {}
                cache.rows.update((m, (scope_id, row)) for m, row in loaded.items())
    return found


def _cache_of(conn: Connection) -> _Cache | None:
    """The cache of the connection's database, for read-only readers; else None."""
    cache = getattr(conn, "_mnemo_row_cache", None)
    if cache is not None:
        return cache
    key = getattr(conn, "_mnemo_shared_key", None)  # set on readers by db.open_connection
    if key is None:
        return None
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None:
            cache = _SHARED[key] = _Cache()
    with contextlib.suppress(AttributeError):
        conn._mnemo_row_cache = cache
    return cache


def _catch_up(conn: Connection, cache: _Cache) -> int | None:
    """Bring the cache to this snapshot's log position and return it; None where the
    cache is at another position (an older snapshot, or a reader racing this one)."""
    row = conn.execute("SELECT max(seq) FROM memory_changes").fetchone()
    seq = int(row[0] or 0)
    with cache.lock:
        since = cache.seq
    if since == seq:
        return seq
    if since > seq:
        return None
    changed: list[Any] | None = None
    if since >= 0:
        first = conn.execute("SELECT min(seq) FROM memory_changes").fetchone()[0]
        if first is not None and first <= since + 1:
            changed = conn.execute(
                "SELECT DISTINCT memory_id FROM memory_changes WHERE seq > ?", (since,)
            ).fetchall()
    with cache.lock:
        if cache.seq != since:
            return None
        if changed is None:  # the first use, or the log was pruned past the cache
            cache.rows = {}
        else:
            for (memory_id,) in changed:
                cache.rows.pop(memory_id, None)
        cache.seq = seq
    return seq


def _select(conn: Connection, scope_id: int, memory_ids: list[int]) -> dict[int, Row]:
    found: dict[int, tuple[Any, ...]] = {}
    sources: dict[int, list[int]] = {}
    for chunk in records.chunked(memory_ids):
        # One query for the rows and their sources: it runs on every request's path.
        for r in conn.execute(
            "SELECT m.id, m.kind, m.text, m.at, m.importance, m.pinned, m.speaker, m.role,"
            " s.message_id FROM memories m LEFT JOIN memory_sources s ON s.memory_id = m.id"
            f" WHERE m.id IN ({records.placeholders(chunk)})"
            " AND +m.scope_id = ? AND +m.state = 'active' ORDER BY s.message_id",
            (*chunk, scope_id),
        ):
            found.setdefault(r[0], r)
            if r[8] is not None:
                sources.setdefault(r[0], []).append(r[8])
    return {
        m: Row(*r[:5], bool(r[5]), r[6], r[7], tuple(sources.get(m, ()))) for m, r in found.items()
    }
