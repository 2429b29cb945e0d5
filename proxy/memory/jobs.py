"""The durable job queue of the background worker, and the request log.

Jobs: ``enqueue`` → ``claim`` (pending → running, attempts + 1) → ``finish`` (done) or
``fail`` (back to pending at ``retry_at``, or failed for good). A crash leaves jobs
'running'; ``requeue_running`` at start puts them back, so no work is lost (a job may
therefore run twice: jobs must be idempotent). Jobs of a deleted scope go with it.

The request log keeps what was sent upstream and why, per request id, pruned by
``prune_requests``. Its order is newest first: by ``created_at`` (when the proxy handled
the request, by the clock), then by rowid (the order entries were first logged in), so
that entries logged at the same time keep a place of their own (`LogPosition`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from proxy.memory.db import Connection
from proxy.memory.records import chunked, placeholders


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed (or listed) job."""

    id: int
    scope_id: int | None
    kind: str
    payload: dict[str, Any]
    state: str
    attempts: int
    run_after: float
    last_error: str | None
    created_at: float
    updated_at: float


_JOB_COLS = (
    "id, scope_id, kind, payload, state, attempts, run_after, last_error, created_at, updated_at"
)


def _job(row: tuple[Any, ...]) -> Job:
    return Job(row[0], row[1], row[2], json.loads(row[3]), *row[4:])


def enqueue(
    conn: Connection,
    kind: str,
    payload: dict[str, Any],
    scope_id: int | None,
    now: float,
    run_after: float | None = None,
) -> int:
    """Queue a job to run at ``run_after`` (default: now); return its id."""
    return conn.execute(
        "INSERT INTO jobs (scope_id, kind, payload, run_after, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            scope_id,
            kind,
            json.dumps(payload, ensure_ascii=False),
            now if run_after is None else run_after,
            now,
            now,
        ),
    ).lastrowid


def claim(conn: Connection, kinds: Iterable[str] | None, now: float, limit: int = 1) -> list[Job]:
    """Take up to ``limit`` due pending jobs (of ``kinds``; None = any), oldest due first,
    and mark them running. Run it through ``Store.write``: claiming is a write."""
    where, params = "state = 'pending' AND run_after <= ?", [now]
    if kinds is not None:
        kinds = list(kinds)
        if not kinds:
            return []
        where += f" AND kind IN ({placeholders(kinds)})"
        params += kinds
    rows = conn.execute(
        f"SELECT {_JOB_COLS} FROM jobs WHERE {where} ORDER BY run_after, id LIMIT ?",
        (*params, limit),
    ).fetchall()
    if not rows:
        return []
    ids = [r[0] for r in rows]
    conn.execute(
        f"UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ?"
        f" WHERE id IN ({placeholders(ids)})",
        (now, *ids),
    )
    return [
        replace(job, state="running", attempts=job.attempts + 1, updated_at=now)
        for job in map(_job, rows)
    ]


def finish(conn: Connection, job_id: int, now: float) -> bool:
    """Mark a running job done."""
    return (
        conn.execute(
            "UPDATE jobs SET state = 'done', updated_at = ? WHERE id = ? AND state = 'running'",
            (now, job_id),
        ).rowcount
        > 0
    )


def fail(
    conn: Connection, job_id: int, error: str, now: float, retry_at: float | None = None
) -> bool:
    """Record a failure: retry at ``retry_at`` (pending again), or, with None, give up
    (state 'failed'). The error text is kept either way."""
    state = "failed" if retry_at is None else "pending"
    return (
        conn.execute(
            "UPDATE jobs SET state = ?, last_error = ?, run_after = coalesce(?, run_after),"
            " updated_at = ? WHERE id = ? AND state = 'running'",
            (state, error, retry_at, now, job_id),
        ).rowcount
        > 0
    )


def requeue(conn: Connection, job_id: int, now: float) -> bool:
    """Give a running job back to the queue without counting the attempt: it gave way
    to a user's request (preempted), it did not fail."""
    return (
        conn.execute(
            "UPDATE jobs SET state = 'pending', attempts = max(attempts - 1, 0),"
            " run_after = ?, updated_at = ? WHERE id = ? AND state = 'running'",
            (now, now, job_id),
        ).rowcount
        > 0
    )


def requeue_running(conn: Connection, now: float) -> int:
    """Put jobs left 'running' by a crash back to pending; return how many. Call at start,
    before the worker claims anything."""
    return conn.execute(
        "UPDATE jobs SET state = 'pending', updated_at = ? WHERE state = 'running'", (now,)
    ).rowcount


def queue_depth(conn: Connection) -> dict[str, dict[str, int]]:
    """Unfinished jobs per kind and state: ``{kind: {"pending": n, "running": m}}``."""
    depth: dict[str, dict[str, int]] = {}
    for kind, state, count in conn.execute(
        "SELECT kind, state, count(*) FROM jobs WHERE state IN ('pending', 'running')"
        " GROUP BY kind, state"
    ):
        depth.setdefault(kind, {"pending": 0, "running": 0})[state] = count
    return depth


def list_jobs(
    conn: Connection, *, states: Iterable[str] | None = None, limit: int = 100
) -> list[Job]:
    """Jobs, newest first, optionally of some states (for inspection)."""
    sql, params = f"SELECT {_JOB_COLS} FROM jobs", []
    if states is not None:
        states = list(states)
        sql += f" WHERE state IN ({placeholders(states)})"
        params += states
    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
    return [_job(r) for r in rows]


def prune_jobs(conn: Connection, before: float) -> int:
    """Delete done and failed jobs last updated before ``before``; return how many."""
    return conn.execute(
        "DELETE FROM jobs WHERE state IN ('done', 'failed') AND updated_at < ?", (before,)
    ).rowcount


# -- request log ------------------------------------------------------------------


class LogPosition(NamedTuple):
    """Where an entry stands in the request log's order (see the module's docstring)."""

    created_at: float
    rowid: int


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One logged request."""

    id: str
    scope_id: int | None
    created_at: float
    detail: dict[str, Any]
    rowid: int

    @property
    def position(self) -> LogPosition:
        return LogPosition(self.created_at, self.rowid)


_REQUEST_COLS = "r.id, r.scope_id, r.created_at, r.detail, r.rowid"


def _request(row: tuple[Any, ...]) -> RequestRow:
    return RequestRow(row[0], row[1], row[2], json.loads(row[3]), row[4])


def log_request(
    conn: Connection, request_id: str, scope_id: int | None, detail: dict[str, Any], now: float
) -> None:
    """Log a request (a second log under the same id replaces the first, keeping its
    place). ``now`` is when the proxy handled it, by the clock: retention and paging go by
    it, so it must never be a request's own "now" (``X-Memory-Now``), which may be any
    date; that belongs in ``detail``."""
    conn.execute(
        "INSERT INTO requests (id, scope_id, created_at, detail) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET scope_id = excluded.scope_id,"
        " detail = excluded.detail",
        (request_id, scope_id, now, json.dumps(detail, ensure_ascii=False, default=str)),
    )


def get_request(conn: Connection, owner: str | None, request_id: str) -> RequestRow | None:
    """A logged request, if it belongs to a scope of ``owner`` (None: any, admin only;
    requests without a scope are visible to the admin only)."""
    row = conn.execute(
        f"SELECT {_REQUEST_COLS} FROM requests r LEFT JOIN scopes s ON s.id = r.scope_id"
        " WHERE r.id = ? AND (? IS NULL OR s.owner = ?)",
        (request_id, owner, owner),
    ).fetchone()
    return _request(row) if row else None


def list_requests(
    conn: Connection,
    scope_id: int,
    *,
    before: float | LogPosition | None = None,
    limit: int = 50,
) -> list[RequestRow]:
    """A scope's logged requests, newest first. Page with ``before``: the last entry's
    `LogPosition` (the entries after it), or a created_at (the entries older than it,
    which skips any logged at that same time)."""
    where, params = "r.scope_id = ?", [scope_id]
    if isinstance(before, LogPosition):
        where += " AND (r.created_at, r.rowid) < (?, ?)"
        params += [before.created_at, before.rowid]
    elif before is not None:
        where += " AND r.created_at < ?"
        params.append(before)
    rows = conn.execute(
        f"SELECT {_REQUEST_COLS} FROM requests r WHERE {where}"
        " ORDER BY r.created_at DESC, r.rowid DESC LIMIT ?",
        (*params, limit),
    )
    return [_request(r) for r in rows]


def prune_requests(conn: Connection, keep_days: float, keep_per_scope: int, now: float) -> int:
    """Delete requests logged more than ``keep_days`` before ``now`` (the clock) and, per
    scope, all but the newest ``keep_per_scope``. Returns how many were deleted."""
    deleted = conn.execute(
        "DELETE FROM requests WHERE created_at < ?", (now - keep_days * 86400,)
    ).rowcount
    stale = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM (SELECT id, row_number() OVER"
            " (PARTITION BY scope_id ORDER BY created_at DESC, rowid DESC) AS n FROM requests)"
            " WHERE n > ?",
            (keep_per_scope,),
        )
    ]
    for chunk in chunked(stale):
        deleted += conn.execute(
            f"DELETE FROM requests WHERE id IN ({placeholders(chunk)})", chunk
        ).rowcount
    return deleted
