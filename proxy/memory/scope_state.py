"""Per-scope state besides memories: the rolling summary with its history, the style sample.

Plain functions taking a connection, confined to the ``scope_id`` given (see the
owner-isolation note in ``proxy.memory.records``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.memory.db import Connection


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """One version of a scope's rolling summary."""

    id: int
    scope_id: int
    text: str
    created_at: float
    covers_until_seq: int
    state: str
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StyleRow:
    """A scope's style sample."""

    scope_id: int
    text: str
    message_id: int | None
    source: str
    enabled: bool
    updated_at: float


# -- summaries ----------------------------------------------------------------------

_SUMMARY_COLS = "id, scope_id, text, created_at, covers_until_seq, state, meta"


def _summary(row: tuple[Any, ...]) -> SummaryRow:
    return SummaryRow(*row[:6], json.loads(row[6]))


def current_summary(conn: Connection, scope_id: int) -> SummaryRow | None:
    """The scope's active rolling summary, if any."""
    row = conn.execute(
        f"SELECT {_SUMMARY_COLS} FROM summaries WHERE scope_id = ? AND state = 'active'",
        (scope_id,),
    ).fetchone()
    return _summary(row) if row else None


def save_summary(
    conn: Connection,
    scope_id: int,
    text: str,
    covers_until_seq: int,
    now: float,
    meta: dict[str, Any] | None = None,
) -> int:
    """Make ``text`` the scope's active summary; the previous one is archived."""
    conn.execute(
        "UPDATE summaries SET state = 'archived' WHERE scope_id = ? AND state = 'active'",
        (scope_id,),
    )
    return conn.execute(
        "INSERT INTO summaries (scope_id, text, created_at, covers_until_seq, meta)"
        " VALUES (?, ?, ?, ?, ?)",
        (scope_id, text, now, covers_until_seq, json.dumps(meta or {}, ensure_ascii=False)),
    ).lastrowid


def list_summaries(conn: Connection, scope_id: int, limit: int = 50) -> list[SummaryRow]:
    """The scope's summaries, newest first (the active one and its history)."""
    rows = conn.execute(
        f"SELECT {_SUMMARY_COLS} FROM summaries WHERE scope_id = ? ORDER BY id DESC LIMIT ?",
        (scope_id, limit),
    )
    return [_summary(r) for r in rows]


def retract_summary(conn: Connection, scope_id: int, summary_id: int) -> bool:
    """Retract a summary; if it was the active one, the newest archived one is restored."""
    row = conn.execute(
        "SELECT state FROM summaries WHERE id = ? AND scope_id = ?", (summary_id, scope_id)
    ).fetchone()
    if row is None or row[0] == "retracted":
        return False
    conn.execute("UPDATE summaries SET state = 'retracted' WHERE id = ?", (summary_id,))
    if row[0] == "active":
        conn.execute(
            "UPDATE summaries SET state = 'active' WHERE id = (SELECT max(id) FROM summaries"
            " WHERE scope_id = ? AND state = 'archived')",
            (scope_id,),
        )
    return True


def get_style(conn: Connection, scope_id: int) -> StyleRow | None:
    """The scope's style sample, enabled or not."""
    row = conn.execute(
        "SELECT scope_id, text, message_id, source, enabled, updated_at FROM style"
        " WHERE scope_id = ?",
        (scope_id,),
    ).fetchone()
    return StyleRow(*row[:4], bool(row[4]), row[5]) if row else None


def set_style(
    conn: Connection,
    scope_id: int,
    text: str,
    source: str,
    now: float,
    message_id: int | None = None,
) -> bool:
    """Set the style sample. An 'auto' capture never replaces a 'manual' sample:
    returns False then. The enabled flag is kept."""
    if source not in ("auto", "manual"):
        raise ValueError(f"style source is 'auto' or 'manual', not {source!r}")
    changed = conn.execute(
        "INSERT INTO style (scope_id, text, message_id, source, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope_id) DO UPDATE SET text = excluded.text,"
        " message_id = excluded.message_id, source = excluded.source,"
        " updated_at = excluded.updated_at"
        " WHERE excluded.source = 'manual' OR style.source = 'auto'",
        (scope_id, text, message_id, source, now),
    ).rowcount
    return changed > 0


def set_style_enabled(conn: Connection, scope_id: int, enabled: bool) -> bool:
    """Turn the style sample on or off; False if the scope has none."""
    return (
        conn.execute(
            "UPDATE style SET enabled = ? WHERE scope_id = ?", (int(enabled), scope_id)
        ).rowcount
        > 0
    )
