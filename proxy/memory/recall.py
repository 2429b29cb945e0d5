"""Reading what a request may be reminded of: recalled memories and the scope's
standing context.

Each runs on a reader thread (`Store.read`), in one snapshot. A request makes three
short trips off the event loop: while its query is being embedded, the scope's context
(`scope_context`: summary, style sample, pinned notes) and the half of the search that
needs no vector (`look_up`: keyword hits, their neighbouring turns, a span's memories);
once the vector is there, the vector half and the ranking (`recall`, `proxy.memory.rank`).
A memory written between the two halves may be missed by the first: it is found by the
second, or by the next request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy.inject.block import Note, Recalled
from proxy.memory import records, scope_state, vectors
from proxy.memory.db import Connection
from proxy.memory.rank import Candidate, Weights, rank
from proxy.memory.recall_rows import Row, load_rows
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
    style_speaker: str | None  # who said the sample (its message's speaker), if known
    notes: tuple[Note, ...]  # the pinned memories, oldest first


def scope_context(conn: Connection, scope_id: int, *, style: bool = True) -> ScopeContext:
    """The active summary, the style sample (if enabled) and the pinned memories."""
    summary = scope_state.current_summary(conn, scope_id)
    sample = scope_state.get_style(conn, scope_id) if style else None
    if sample is not None and not sample.enabled:
        sample = None
    pinned = records.list_memories(conn, scope_id, pinned=True, limit=50)
    speaker = None
    if sample is not None and sample.message_id is not None:
        row = conn.execute(
            "SELECT speaker FROM messages WHERE id = ? AND scope_id = ?",
            (sample.message_id, scope_id),
        ).fetchone()
        speaker = row[0] if row else None
    return ScopeContext(
        summary=summary.text if summary else None,
        style_text=sample.text if sample else None,
        style_message_id=sample.message_id if sample else None,
        style_speaker=speaker,
        notes=tuple(Note(m.text, m.id, m.kind) for m in reversed(pinned)),
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


@dataclass(frozen=True)
class Lookup:
    """The half of a search that needs no query vector (`look_up`): done while the
    query is being embedded, so that only the vector half waits for it."""

    span: TimeSpan | None  # the span of time the query names, if any
    ranks: dict[int, int]  # keyword (BM25) hits: memory id -> position, 0 = best
    adjacent: dict[int, list[int]]  # the keyword seeds' neighbouring turns
    rows: dict[int, Row]  # the rows of all of the above
    span_ids: tuple[int, ...] = ()  # memories dated inside the span
    context: bool = False  # whether neighbouring turns are wanted


def look_up(
    conn: Connection,
    scope_id: int,
    text: str,
    k: int,
    *,
    now: float | None = None,
    span: TimeSpan | None = None,
    context: bool = False,
) -> Lookup:
    """Keyword matches of `text` and, with `context`, their neighbouring turns; with a
    span (given, or named by `text` relative to `now`), the memories dated inside it."""
    if span is None and now is not None:
        span = find_span(text, now)
    ranks = {
        hit.memory_id: position
        for position, hit in enumerate(vectors.keyword_search(conn, scope_id, text, k))
    }
    adjacent: dict[int, list[int]] = {}
    if context and ranks:
        # Around the best hits only: the others seldom reach the block.
        adjacent = _adjacent(conn, scope_id, sorted(ranks, key=ranks.__getitem__)[:CONTEXT_SEEDS])
    span_ids: tuple[int, ...] = ()
    if span is not None:
        span_ids = tuple(
            r[0]
            for r in conn.execute(
                "SELECT id FROM memories WHERE scope_id = ? AND state = 'active'"
                " AND +at >= ? AND +at < ? LIMIT ?",
                (scope_id, span.start, span.end, SPAN_SCAN),
            )
        )
    wanted = [*ranks, *(n for ns in adjacent.values() for n in ns)]
    return Lookup(span, ranks, adjacent, load_rows(conn, scope_id, wanted), span_ids, context)


def recall(
    conn: Connection,
    scope_id: int,
    query: RecallQuery,
    lookup: Lookup | None = None,
    *,
    timings: dict[str, float] | None = None,
) -> list[Recalled]:
    """The memories to remind the model of, best first (see `rank`).

    A span of time the query names ("last Saturday", "in March") brings in the
    memories of that span and favours them (`Weights.time`); `Weights.context` turns
    on neighbouring turns (`find_candidates`). `lookup`: this query's `look_up`, done
    beforehand (in the same scope); without it, it is done here. `timings` gets the
    milliseconds of its steps: `search_ms` (the vector searches and neighbouring
    turns), `rows_ms` (the candidates' rows), `rank_ms`.
    """
    w = query.weights
    if lookup is None:
        lookup = look_up(
            conn,
            scope_id,
            query.text,
            query.candidates,
            now=query.now if w.time > 0 else None,
            context=w.context > 0,
        )
    laps = timings if timings is not None else {}
    candidates = _candidates(conn, scope_id, query.vector, query.candidates, lookup, laps)
    started = time.perf_counter()
    ranked = rank(
        candidates,
        now=query.now,
        weights=w,
        exclude_sources=set(query.exclude_sources),
        limit=query.limit,
        span=lookup.span if w.time > 0 else None,
    )
    laps["rank_ms"] = _ms(started)
    return ranked


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
    lookup = look_up(conn, scope_id, query_text, k, span=span, context=context)
    return _candidates(conn, scope_id, query_vec, k, lookup)


def _candidates(
    conn: Connection,
    scope_id: int,
    query_vec: np.ndarray | None,
    k: int,
    lookup: Lookup,
    timings: dict[str, float] | None = None,
) -> list[Candidate]:
    """`find_candidates` from a lookup: the vector half, then the merge (`timings`: see
    `recall`)."""
    started = time.perf_counter()
    ranks = lookup.ranks
    adjacent = {m: list(ns) for m, ns in lookup.adjacent.items()}
    sims: dict[int, float] = {}
    search = vectors.QuerySearch(conn, scope_id, query_vec) if query_vec is not None else None
    if search is not None:
        sims = {hit.memory_id: hit.similarity for hit in search.knn(k)}
        if lookup.span_ids:
            span_sims = search.similarities(lookup.span_ids)
            for memory_id in sorted(span_sims, key=lambda m: -span_sims[m])[:k]:
                sims.setdefault(memory_id, span_sims[memory_id])
        if lookup.context:  # around the best vector hits too (the keyword ones are done)
            seeds = sorted(sims, key=lambda m: -sims[m])[:CONTEXT_SEEDS]
            new = [m for m in seeds if m not in lookup.adjacent]
            for memory_id, others in _adjacent(conn, scope_id, new).items():
                adjacent.setdefault(memory_id, []).extend(others)
    ids = list(dict.fromkeys([*sims, *ranks]))
    if adjacent:
        ids = list(dict.fromkeys([*ids, *(n for ns in adjacent.values() for n in ns)]))
        for memory_id, others in list(adjacent.items()):  # a neighbour's neighbour is it
            for other in others:
                adjacent.setdefault(other, []).append(memory_id)
    if search is not None:
        sims.update(search.similarities([i for i in ids if i not in sims]))
    searched = time.perf_counter()
    rows = dict(lookup.rows)
    rows.update(load_rows(conn, scope_id, [i for i in ids if i not in rows]))
    context = {m: max(sims.get(n, 0.0) for n in ns) for m, ns in adjacent.items() if ns}
    # Positional: ~150 candidates a request, and keywords cost a NamedTuple more.
    candidates = [
        Candidate(
            row.id,
            row.kind,
            row.text,
            row.at,
            row.importance,
            sims.get(row.id),  # vector_sim
            ranks.get(row.id),  # bm25_rank
            row.sources,
            row.speaker,
            row.role,
            False,  # pinned: those are notes, left out here
            context.get(row.id),
        )
        for row in (rows[i] for i in ids if i in rows)
        if not row.pinned
    ]
    if timings is not None:
        timings["search_ms"] = _ms(started, searched)
        timings["rows_ms"] = _ms(searched)
    return candidates


def _ms(start: float, end: float | None = None) -> float:
    """Milliseconds from `start` to `end` (now), as the request log keeps them."""
    return round(((end if end is not None else time.perf_counter()) - start) * 1000, 3)


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


def query_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text recall searches for: the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""
