"""Reading what a request may be reminded of: candidates and the scope's standing context.

Both functions run on a reader thread (`Store.read`), each in one snapshot, so a
request costs two short trips off the event loop: the scope's context (summary, style
sample, pinned notes) and, once the query is embedded, the search itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy.memory import records, scope_state, vectors
from proxy.memory.db import Connection
from proxy.memory.rank import Candidate
from proxy.messages import message_text


@dataclass(frozen=True)
class ScopeContext:
    """What a scope always brings, whatever the question."""

    summary: str | None
    style_text: str | None
    style_message_id: int | None
    notes: tuple[str, ...]


def scope_context(conn: Connection, scope_id: int, *, style: bool = True) -> ScopeContext:
    """The active summary, the style sample (if enabled) and the pinned memories."""
    summary = scope_state.current_summary(conn, scope_id)
    sample = scope_state.get_style(conn, scope_id) if style else None
    if sample is not None and not sample.enabled:
        sample = None
    pinned = records.list_memories(conn, scope_id, pinned=True, limit=50)
    return ScopeContext(
        summary=summary.text if summary else None,
        style_text=sample.text if sample else None,
        style_message_id=sample.message_id if sample else None,
        notes=tuple(m.text for m in reversed(pinned)),
    )


def find_candidates(
    conn: Connection,
    scope_id: int,
    query_vec: np.ndarray | None,
    query_text: str,
    k: int,
) -> list[Candidate]:
    """Vector neighbours and keyword (BM25) matches of the query, merged by memory.

    Pinned memories are left out: they are always shown, as notes.
    """
    sims = {}
    if query_vec is not None:
        sims = {hit.memory_id: hit.similarity for hit in vectors.knn(conn, scope_id, query_vec, k)}
    ranks = {
        hit.memory_id: position
        for position, hit in enumerate(vectors.keyword_search(conn, scope_id, query_text, k))
    }
    rows = records.load_candidates(conn, scope_id, [*sims, *ranks])
    return [
        Candidate(
            memory_id=row.id,
            kind=row.kind,
            text=row.text,
            at=row.at,
            importance=row.importance,
            vector_sim=sims.get(row.id),
            bm25_rank=ranks.get(row.id),
            source_ids=row.sources,
            speaker=row.speaker,
            role=row.role,
        )
        for row in rows
        if not row.pinned
    ]


def query_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text recall searches for: the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""
