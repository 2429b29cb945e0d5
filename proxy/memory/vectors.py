"""Vectors and search: a bit-packed KNN scan with exact re-scoring, and FTS5 keyword search.

Vector layout (numbers from bench/knn.py, real MiniLM vectors):
- ``embeddings(memory_id, vector, pack, slot)``: each memory's unit float32 vector,
  zero-padded to a multiple of 8 dimensions (padding changes no dot product).
- ``vector_packs(scope_id, ids, bits, dirty)``: the sign bits of the active
  memories' vectors, packed per scope in blobs of up to ``PACK_SIZE`` entries.
- ``knn`` reads the scope's packs (a few blobs, not one row per memory), ranks every
  entry by Hamming distance in numpy, re-scores the best ``k * OVERSAMPLE`` exactly
  (cosine, from the float vectors) and returns the best ``k`` with their true cosine
  similarities (higher = more similar).

Why not a sqlite-vec ``vec0`` table: its KNN (0.1.9) selects the top k per chunk in
O(k * n), so the oversampled k that bit quantization needs (k * 8 for recall@10 of
0.98) cost 10 ms at 100k rows in one partition, against a few ms for this scan.

Keeping packs true: triggers mark a pack dirty when one of its memories leaves
'active' or loses its vector (whoever changes it, in whatever code). A search masks
the dirty packs' stale entries; ``store_vectors`` and ``compact_vectors`` rewrite
dirty packs. Every result is re-checked against ``memories`` (scope, state) anyway:
inactive memories never come back.

Keyword search is BM25 over FTS5, confined to a scope by a rowid range (see
migrations.py); the query keeps its rarest words within a postings budget, so its
cost stays bounded in big stores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from proxy.memory.db import Connection, StoreError
from proxy.memory.records import chunked, get_meta, placeholders, set_meta

# Entries per pack: a store of new vectors rewrites the scope's last pack, a search
# reads all of a scope's packs; 512 keeps both cheap (28 KB per pack at 384-d).
PACK_SIZE = 512
# Bit-KNN candidates re-scored per wanted result; bench/knn.py: recall@10 vs exact
# cosine on real MiniLM vectors is 0.98 at 8, 0.99 at 12, 0.996 at 16.
OVERSAMPLE = 12
# FTS5 rowid = (scope_id << SCOPE_SHIFT) + memory id; the triggers in m001 use 40.
SCOPE_SHIFT = 40

_META_MODEL = "embedding_model"
_META_DIM = "embedding_dim"


class EmbeddingModelMismatch(StoreError):
    """Vectors of one embedding model were offered to a store holding another's."""


class VectorHit(NamedTuple):
    """A KNN result: cosine similarity, higher = more similar."""

    memory_id: int
    similarity: float


class KeywordHit(NamedTuple):
    """A keyword result: BM25 relevance (negated, so higher = more relevant)."""

    memory_id: int
    score: float


# -- the embedding model ----------------------------------------------------------


def embedding_model(conn: Connection) -> tuple[str, int] | None:
    """The (model id, dimension) whose vectors the store holds, if any was recorded."""
    model, dim = get_meta(conn, _META_MODEL), get_meta(conn, _META_DIM)
    if model is None or dim is None:
        return None
    return model, int(dim)


def ensure_embedding_model(conn: Connection, model_id: str, dim: int) -> bool:
    """Record the model at start; if the store holds another model's vectors, reset them.

    Returns True when the vectors were reset (every memory will be re-embedded).
    """
    current = embedding_model(conn)
    if current == (model_id, dim):
        return False
    if current is None and not conn.execute("SELECT 1 FROM embeddings LIMIT 1").fetchone():
        set_meta(conn, _META_MODEL, model_id)
        set_meta(conn, _META_DIM, str(dim))
        return False
    reset_vectors(conn, model_id, dim)
    return True


def reset_vectors(conn: Connection, model_id: str, dim: int) -> int:
    """Drop every vector, record the new model, and mark every memory unembedded.

    Returns the number of active memories now waiting to be embedded.
    """
    conn.execute("DELETE FROM vector_packs")
    conn.execute("UPDATE embeddings SET pack = NULL WHERE pack IS NOT NULL")
    conn.execute("DELETE FROM embeddings")
    conn.execute("UPDATE memories SET embedded = 0 WHERE embedded != 0")
    set_meta(conn, _META_MODEL, model_id)
    set_meta(conn, _META_DIM, str(dim))
    return conn.execute(
        "SELECT count(*) FROM memories WHERE state = 'active' AND embedded = 0"
    ).fetchone()[0]


# -- encoding ---------------------------------------------------------------------


def _unit(vector: Sequence[float] | np.ndarray, dim: int) -> np.ndarray:
    """The vector as unit-length float32, zero-padded to a multiple of 8."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise ValueError(f"expected a {dim}-dimensional vector, got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise ValueError("vector has NaN or infinite values")
    out = np.zeros(-(-dim // 8) * 8, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    if norm > 0:
        out[:dim] = v / norm
    return out


def _sign_bits(unit: np.ndarray) -> bytes:
    """Sign bits of a vector, padded to whole 64-bit words (the scan's unit)."""
    packed = np.packbits(unit > 0)
    words = -(-len(packed) // 8)
    return packed.tobytes().ljust(words * 8, b"\0")


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _hamming(bits: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distances of each row of ``bits`` (uint64 words) to ``query``."""
    diff = bits ^ query
    bitwise_count = getattr(np, "bitwise_count", None)  # numpy >= 2.0
    counts = bitwise_count(diff) if bitwise_count else _POPCOUNT8[diff.view(np.uint8)]
    return counts.sum(axis=1, dtype=np.int32)


# -- writing vectors --------------------------------------------------------------


def store_vectors(
    conn: Connection,
    model_id: str,
    pairs: Iterable[tuple[int, Sequence[float] | np.ndarray]],
) -> int:
    """Store the vectors of memories and mark them embedded; return how many.

    The first vector ever stored fixes the store's model and dimension. Vectors of
    memories that no longer exist are skipped (deleted while being embedded); an
    inactive memory keeps its float vector but is not searchable. Dirty packs are
    compacted on the way. Raises EmbeddingModelMismatch if the store holds another
    model's vectors.
    """
    latest = dict(pairs)  # one vector per memory: the last one given
    if not latest:
        return 0
    current = embedding_model(conn)
    if current is None:
        dim = int(np.asarray(next(iter(latest.values()))).reshape(-1).shape[0])
        set_meta(conn, _META_MODEL, model_id)
        set_meta(conn, _META_DIM, str(dim))
    elif current[0] != model_id:
        raise EmbeddingModelMismatch(
            f"the store holds vectors of {current[0]!r}, not {model_id!r}; "
            "call reset_vectors to switch models"
        )
    else:
        dim = current[1]
    units = {memory_id: _unit(vector, dim) for memory_id, vector in latest.items()}
    appends: dict[int, list[tuple[int, bytes]]] = {}
    stored = 0
    for chunk in chunked(units):
        rows = conn.execute(
            f"SELECT id, scope_id, state FROM memories WHERE id IN ({placeholders(chunk)})", chunk
        ).fetchall()
        for memory_id, scope_id, state in rows:
            unit = units[memory_id]
            # Deleting the old vector marks its pack entry stale (trigger).
            conn.execute("DELETE FROM embeddings WHERE memory_id = ?", (memory_id,))
            conn.execute(
                "INSERT INTO embeddings (memory_id, vector) VALUES (?, ?)",
                (memory_id, unit.tobytes()),
            )
            if state == "active":
                appends.setdefault(scope_id, []).append((memory_id, _sign_bits(unit)))
            stored += 1
        found = [r[0] for r in rows]
        if found:
            conn.execute(
                f"UPDATE memories SET embedded = 1 WHERE id IN ({placeholders(found)})", found
            )
    for scope_id, entries in appends.items():
        _append(conn, scope_id, entries)
    compact_vectors(conn)
    return stored


def _append(conn: Connection, scope_id: int, entries: list[tuple[int, bytes]]) -> None:
    """Add (memory id, sign bits) entries to the scope's packs, filling the last one."""
    last = conn.execute(
        "SELECT id, ids, bits FROM vector_packs WHERE scope_id = ? ORDER BY id DESC LIMIT 1",
        (scope_id,),
    ).fetchone()
    pack_id, ids, bits = last if last else (None, b"", b"")
    slots: list[tuple[int, int, int]] = []
    pending = list(entries)
    while pending:
        used = len(ids) // 8
        if pack_id is None or used >= PACK_SIZE:
            pack_id = conn.execute(
                "INSERT INTO vector_packs (scope_id, ids, bits) VALUES (?, x'', x'')", (scope_id,)
            ).lastrowid
            ids, bits, used = b"", b"", 0
        room, pending = pending[: PACK_SIZE - used], pending[PACK_SIZE - used :]
        ids += np.array([m for m, _ in room], dtype="<i8").tobytes()
        bits += b"".join(b for _, b in room)
        slots += [(pack_id, used + i, m) for i, (m, _) in enumerate(room)]
        conn.execute("UPDATE vector_packs SET ids = ?, bits = ? WHERE id = ?", (ids, bits, pack_id))
    conn.executemany("UPDATE embeddings SET pack = ?, slot = ? WHERE memory_id = ?", slots)


def compact_vectors(conn: Connection) -> int:
    """Rewrite every dirty pack without its stale entries; return how many were rewritten."""
    dirty = [r[0] for r in conn.execute("SELECT id FROM vector_packs WHERE dirty = 1")]
    for pack_id in dirty:
        ids, bits = conn.execute(
            "SELECT ids, bits FROM vector_packs WHERE id = ?", (pack_id,)
        ).fetchone()
        live = _live_slots(conn, [pack_id])
        entries = np.frombuffer(ids, dtype="<i8")
        width = len(bits) // max(len(entries), 1)
        keep = [i for i, m in enumerate(entries.tolist()) if (pack_id, i, m) in live]
        if not keep:
            conn.execute("DELETE FROM vector_packs WHERE id = ?", (pack_id,))
            continue
        conn.execute(
            "UPDATE vector_packs SET ids = ?, bits = ?, dirty = 0 WHERE id = ?",
            (
                entries[keep].tobytes(),
                b"".join(bits[i * width : (i + 1) * width] for i in keep),
                pack_id,
            ),
        )
        conn.executemany(
            "UPDATE embeddings SET slot = ? WHERE memory_id = ?",
            [(new, int(entries[old])) for new, old in enumerate(keep)],
        )
    return len(dirty)


def _live_slots(conn: Connection, pack_ids: list[int]) -> set[tuple[int, int, int]]:
    """(pack, slot, memory id) of the entries of these packs that are still true."""
    return {
        (pack, slot, memory_id)
        for pack, slot, memory_id in conn.execute(
            "SELECT e.pack, e.slot, e.memory_id FROM embeddings e"
            " JOIN memories m ON m.id = e.memory_id"
            f" WHERE e.pack IN ({placeholders(pack_ids)}) AND m.state = 'active'",
            pack_ids,
        )
    }


# -- vector search ----------------------------------------------------------------


def knn(
    conn: Connection,
    scope_id: int,
    query_vec: Sequence[float] | np.ndarray,
    k: int,
    *,
    oversample: int = OVERSAMPLE,
) -> list[VectorHit]:
    """The ``k`` active memories of the scope nearest to ``query_vec``, best first.

    Similarities are exact cosines. An empty list when nothing is embedded yet.
    """
    model = embedding_model(conn)
    if k <= 0 or model is None:
        return []
    query = _unit(query_vec, model[1])
    packs = conn.execute(
        "SELECT id, ids, bits, dirty FROM vector_packs WHERE scope_id = ?", (scope_id,)
    ).fetchall()
    if not packs:
        return []
    ids = np.frombuffer(b"".join(p[1] for p in packs), dtype="<i8")
    qbits = np.frombuffer(_sign_bits(query), dtype="<u8")
    bits = np.frombuffer(b"".join(p[2] for p in packs), dtype="<u8").reshape(len(ids), -1)
    if bits.shape[1] != len(qbits):
        raise StoreError("stored vectors do not match the store's dimension; reset_vectors")
    distances = _hamming(bits, qbits)
    dirty = [p[0] for p in packs if p[3]]
    if dirty:  # mask entries that went stale since the last compaction
        in_dirty = np.repeat([bool(p[3]) for p in packs], [len(p[1]) // 8 for p in packs])
        live = np.fromiter((m for _, _, m in _live_slots(conn, dirty)), dtype="<i8")
        distances[in_dirty & ~np.isin(ids, live)] = np.iinfo(np.int32).max
    order = np.argsort(distances, kind="stable")
    wanted = max(k * oversample, k)
    hits: list[VectorHit] = []
    # Normally one round; more only if candidates turn out inactive.
    for start in range(0, len(order), wanted):
        batch = [int(ids[i]) for i in order[start : start + wanted]]
        hits += _rescore(conn, scope_id, batch, query)
        if len(hits) >= k:
            break
    hits.sort(key=lambda h: -h.similarity)
    return hits[:k]


def _rescore(
    conn: Connection, scope_id: int, memory_ids: list[int], query: np.ndarray
) -> list[VectorHit]:
    """Exact cosine of the active memories of the scope among ``memory_ids``."""
    found: list[int] = []
    blobs: list[bytes] = []
    for chunk in chunked(memory_ids):
        for memory_id, blob in conn.execute(
            "SELECT e.memory_id, e.vector FROM embeddings e JOIN memories m ON m.id = e.memory_id"
            f" WHERE e.memory_id IN ({placeholders(chunk)})"
            " AND m.scope_id = ? AND m.state = 'active'",
            (*chunk, scope_id),
        ):
            found.append(memory_id)
            blobs.append(blob)
    if not found:
        return []
    matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found), -1)
    sims = matrix @ query
    return [VectorHit(m, float(s)) for m, s in zip(found, sims.tolist(), strict=True)]


# -- keyword search ---------------------------------------------------------------

# Very common English words: they match nearly everything and only cost time.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on once
    only or other our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves s t d ll m re ve don didn doesn isn wasn aren""".split()  # noqa: SIM905
)
MAX_TERMS = 16
# A keyword query keeps its rarest words while their postings (documents containing
# them, all scopes) add up to at most this; BM25 costs ~1 us per matching row.
POSTINGS_BUDGET = 2000
_WORD = re.compile(r"\w+", re.UNICODE)


def query_words(text: str) -> list[str]:
    """The distinct words of free text that are worth searching for, in order.

    Everything but letters and digits is dropped (so FTS5 operators, quotes,
    parentheses and column filters are only punctuation); stopwords are dropped
    unless nothing else is left; long texts keep their ``MAX_TERMS`` longest words.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text or "")))
    words = [w for w in words if w.strip("_")]
    kept = [w for w in words if w not in STOPWORDS] or words
    if len(kept) > MAX_TERMS:
        longest = set(sorted(kept, key=len, reverse=True)[:MAX_TERMS])
        kept = [w for w in kept if w in longest][:MAX_TERMS]
    return kept


def match_expression(words: Sequence[str]) -> str | None:
    """A safe FTS5 MATCH expression: the words, each quoted, OR-ed (None if none)."""
    # \\w+ never contains a double quote, so quoting makes each a plain phrase.
    return " OR ".join(f'"{w}"' for w in words) or None


def keyword_search(conn: Connection, scope_id: int, query_text: str, k: int) -> list[KeywordHit]:
    """The ``k`` active memories of the scope that best match the words of
    ``query_text`` (BM25), best first. Any text is safe to pass."""
    words = query_words(query_text)
    if not words or k <= 0:
        return []
    expression = match_expression(_rarest(conn, words))
    if expression is None:
        return []
    low = scope_id << SCOPE_SHIFT
    rows = conn.execute(
        "SELECT rowid, rank FROM memories_fts WHERE memories_fts MATCH ?"
        " AND rowid BETWEEN ? AND ? ORDER BY rank LIMIT ?",
        (expression, low, low + (1 << SCOPE_SHIFT) - 1, k),
    ).fetchall()
    if not rows:
        return []
    ids = [rowid - low for rowid, _ in rows]
    live = {
        r[0]
        for r in conn.execute(
            f"SELECT id FROM memories WHERE id IN ({placeholders(ids)})"
            " AND scope_id = ? AND state = 'active'",
            (*ids, scope_id),
        )
    }
    return [
        KeywordHit(memory_id, -rank)
        for memory_id, (_, rank) in zip(ids, rows, strict=True)
        if memory_id in live
    ]


def _rarest(conn: Connection, words: list[str]) -> list[str]:
    """The words that occur in the index, rarest first, within the postings budget."""
    # The index holds stemmed terms; let FTS5 stem the words the same way, in a
    # connection-private temp table, then read each term's document count.
    conn.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5 ("
        "word, tokenize = 'porter unicode61 remove_diacritics 2')"
    )
    conn.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms"
        " USING fts5vocab (temp, query_words, 'instance')"
    )
    conn.executemany("INSERT INTO temp.query_words (rowid, word) VALUES (?, ?)", enumerate(words))
    try:
        terms = conn.execute("SELECT doc, term FROM temp.query_terms").fetchall()
    finally:
        conn.execute("DELETE FROM temp.query_words")
    counted: dict[str, int] = {}
    for index, term in terms:
        row = conn.execute("SELECT doc FROM memories_fts_vocab WHERE term = ?", (term,)).fetchone()
        if row:  # a word may stem to several terms: count it by its most common one
            counted[words[index]] = max(counted.get(words[index], 0), row[0])
    kept: list[str] = []
    total = 0
    for word, postings in sorted(counted.items(), key=lambda item: item[1]):
        if kept and total + postings > POSTINGS_BUDGET:
            break
        kept.append(word)
        total += postings
    return kept
