"""Reading what a request may be reminded of: recalled memories and the scope's
standing context.

`scope_context` and `recall` run on a reader thread (`Store.read`), each in one
snapshot, so a request costs two short trips off the event loop: the scope's context
(summary, style sample, pinned notes) and, once the query is embedded, the search
(`find_candidates`) and its ranking (`proxy.memory.rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy.inject.block import Recalled
from proxy.memory import records, scope_state, vectors
from proxy.memory.db import Connection
from proxy.memory.rank import Candidate, Weights, rank
from proxy.memory.timeq import TimeSpan, find_span
from proxy.messages import message_text

# Most memories of a span of time re-scored exactly for its candidates.
SPAN_SCAN = 5000
# Neighbouring turns are fetched around this many of the best candidates of each search.
CONTEXT_SEEDS = 20


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


@dataclass(frozen=True)
class RecallQuery:
    """What one request asks of recall."""

    text: str  # what to search for (see `query_text`)
    vector: np.ndarray | None  # its embedding; None: keyword search only
    now: float  # the request's "now" (recency, and "last Saturday" in the text)
    weights: Weights
    candidates: int  # taken from each of vector and keyword search
    limit: int  # most memories returned
    exclude_sources: frozenset[int] = frozenset()  # messages the model sees anyway


def recall(conn: Connection, scope_id: int, query: RecallQuery) -> list[Recalled]:
    """The memories to remind the model of, best first (see `rank`).

    A span of time the query names ("last Saturday", "in March") brings in the
    memories of that span and favours them (`Weights.time`); `Weights.context` turns
    on neighbouring turns (`find_candidates`).
    """
    w = query.weights
    span = find_span(query.text, query.now) if w.time > 0 else None
    candidates = find_candidates(
        conn,
        scope_id,
        query.vector,
        query.text,
        query.candidates,
        span=span,
        context=w.context > 0,
    )
    return rank(
        candidates,
        now=query.now,
        weights=w,
        exclude_sources=set(query.exclude_sources),
        limit=query.limit,
        span=span,
    )


def find_candidates(
    conn: Connection,
    scope_id: int,
    query_vec: np.ndarray | None,
    query_text: str,
    k: int,
    *,
    span: TimeSpan | None = None,
    context: bool = False,
) -> list[Candidate]:
    """Vector neighbours and keyword (BM25) matches of the query, merged by memory.

    Every candidate gets its exact similarity to the query, also those found only by
    keyword. With a `span` of time the query names, the `k` memories of that span
    most similar to the query join (the scope-wide search may rank them out). With
    `context`, the turns next to the best candidates (the other pieces of their
    message and the messages just before and after it in its chat) join too, and
    each of them carries the best similarity among its neighbours
    (`Candidate.context_sim`).

    Pinned memories are left out: they are always shown, as notes.
    """
    sims: dict[int, float] = {}
    if query_vec is not None:
        sims = {hit.memory_id: hit.similarity for hit in vectors.knn(conn, scope_id, query_vec, k)}
        if span is not None:
            for memory_id, sim in _span_neighbours(conn, scope_id, query_vec, span, k):
                sims.setdefault(memory_id, sim)
    ranks = {
        hit.memory_id: position
        for position, hit in enumerate(vectors.keyword_search(conn, scope_id, query_text, k))
    }
    ids = list(dict.fromkeys([*sims, *ranks]))
    adjacent: dict[int, list[int]] = {}
    if context and ids:
        # Around the best of each search only: the others seldom reach the block.
        seeds = sorted(sims, key=lambda m: -sims[m])[:CONTEXT_SEEDS]
        seeds += sorted(ranks, key=lambda m: ranks[m])[:CONTEXT_SEEDS]
        adjacent = _adjacent(conn, scope_id, list(dict.fromkeys(seeds)))
        ids = list(dict.fromkeys([*ids, *(n for ns in adjacent.values() for n in ns)]))
        for memory_id, others in list(adjacent.items()):  # a neighbour's neighbour is it
            for other in others:
                adjacent.setdefault(other, []).append(memory_id)
    if query_vec is not None:
        sims.update(_similarities(conn, [i for i in ids if i not in sims], query_vec))
    rows = records.load_candidates(conn, scope_id, ids)
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
            context_sim=max((sims.get(n, 0.0) for n in adjacent.get(row.id, ())), default=None),
        )
        for row in rows
        if not row.pinned
    ]


def _adjacent(conn: Connection, scope_id: int, memory_ids: Sequence[int]) -> dict[int, list[int]]:
    """Per memory: the active turn memories of its own message (other pieces) and of the
    messages right before and after it in the same chat."""
    out: dict[int, list[int]] = {}
    for chunk in records.chunked(list(memory_ids)):
        for memory_id, other in conn.execute(
            "SELECT s.memory_id, t.memory_id FROM memory_sources s"
            " JOIN messages a ON a.id = s.message_id"
            " JOIN messages b ON b.scope_id = a.scope_id AND b.seq BETWEEN a.seq - 1 AND a.seq + 1"
            " AND b.thread = a.thread"
            " JOIN memory_sources t ON t.message_id = b.id"
            " JOIN memories m ON m.id = t.memory_id"
            f" WHERE s.memory_id IN ({records.placeholders(chunk)})"
            " AND +m.scope_id = ? AND +m.state = 'active' AND +m.kind = 'turn'"
            " AND t.memory_id != s.memory_id",
            (*chunk, scope_id),
        ):
            out.setdefault(memory_id, []).append(other)
    return out


def _similarities(
    conn: Connection, memory_ids: Sequence[int], query_vec: np.ndarray
) -> dict[int, float]:
    """Exact cosine similarity to the query of those memories that have a vector."""
    if not memory_ids:
        return {}
    found: list[int] = []
    blobs: list[bytes] = []
    for chunk in records.chunked(list(memory_ids)):
        for memory_id, blob in conn.execute(
            "SELECT memory_id, vector FROM embeddings"
            f" WHERE memory_id IN ({records.placeholders(chunk)})",
            chunk,
        ):
            found.append(memory_id)
            blobs.append(blob)
    if not found:
        return {}
    matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found), -1)
    sims = matrix @ _padded(query_vec, matrix.shape[1])
    return dict(zip(found, (float(x) for x in sims), strict=True))


def _padded(query_vec: np.ndarray, width: int) -> np.ndarray:
    """The query as a unit float32 vector of the stored width (stored vectors are
    zero-padded to a multiple of 8 dimensions)."""
    q = np.asarray(query_vec, dtype=np.float32).reshape(-1)[:width]
    out = np.zeros(width, dtype=np.float32)
    out[: len(q)] = q
    norm = float(np.linalg.norm(out))
    return out / norm if norm > 0 else out


def _span_neighbours(
    conn: Connection, scope_id: int, query_vec: np.ndarray, span: TimeSpan, k: int
) -> list[tuple[int, float]]:
    """The `k` active memories dated inside `span` most similar to the query (exact)."""
    rows = conn.execute(
        "SELECT e.memory_id, e.vector FROM memories m JOIN embeddings e ON e.memory_id = m.id"
        " WHERE m.scope_id = ? AND m.state = 'active' AND +m.at >= ? AND +m.at < ? LIMIT ?",
        (scope_id, span.start, span.end, SPAN_SCAN),
    ).fetchall()
    if not rows:
        return []
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    sims = matrix @ _padded(query_vec, matrix.shape[1])
    best = np.argsort(-sims, kind="stable")[:k]
    return [(int(rows[i][0]), float(sims[i])) for i in best]


def query_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text recall searches for: the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""
