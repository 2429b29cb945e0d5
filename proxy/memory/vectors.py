"""Vectors and search: sqlite-vec KNN with exact re-scoring, and FTS5 keyword search.

Layout (measured in bench/knn.py):
- ``embeddings(memory_id, vector)``: each memory's unit float32 vector, zero-padded to
  a multiple of 8 dimensions (padding changes no dot product).
- ``memories_vec``: a vec0 table ``(scope_id integer partition key, embedding bit[D])``
  holding the sign bits of those vectors, for active memories only. sqlite-vec is
  brute force; Hamming distance over bits is ~20x cheaper than float cosine, and
  the partition key confines a scan to one scope.
- ``knn`` takes the ``k * oversample`` nearest by Hamming distance, then re-scores
  them exactly (cosine) from the float vectors and returns the best ``k`` with their
  true cosine similarities (higher = more similar).

Triggers created with the vec0 table keep it equal to "active memories that have a
vector": retracting, superseding, deleting a memory or dropping its vector removes
its row; re-activating it puts the row back. So inactive memories never take a KNN
slot, whoever changes their state.

The vec0 table depends on the embedding dimension, so it is created with the first
vector (the model id and dimension go into ``meta``); ``reset_vectors`` drops it when
the model changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from proxy.memory.db import Connection, StoreError
from proxy.memory.records import chunked, get_meta, placeholders, set_meta

# Rows per vec0 chunk. Each partition (scope) reserves at least one chunk; bit
# vectors are small, so small chunks cost little in file size and KNN time.
CHUNK_SIZE = 64
# Bit-KNN candidates per wanted result; chosen so recall@10 >= 0.98 vs exact cosine
# on real MiniLM vectors (bench/knn.py).
OVERSAMPLE = 8
MAX_K = 4096  # sqlite-vec's limit on k

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


# -- the embedding model and the vec0 table ---------------------------------------


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
    if current is None and not _has_vec_table(conn):
        set_meta(conn, _META_MODEL, model_id)
        set_meta(conn, _META_DIM, str(dim))
        return False
    reset_vectors(conn, model_id, dim)
    return True


def reset_vectors(conn: Connection, model_id: str, dim: int) -> int:
    """Drop every vector, record the new model, and mark every memory unembedded.

    Returns the number of active memories now waiting to be embedded.
    """
    for trigger in _VEC_TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.execute("DROP TABLE IF EXISTS memories_vec")
    conn.execute("DELETE FROM embeddings")
    conn.execute("UPDATE memories SET embedded = 0 WHERE embedded != 0")
    set_meta(conn, _META_MODEL, model_id)
    set_meta(conn, _META_DIM, str(dim))
    return conn.execute(
        "SELECT count(*) FROM memories WHERE state = 'active' AND embedded = 0"
    ).fetchone()[0]


_VEC_TRIGGERS = (
    "memories_vec_on_embed",
    "memories_vec_on_unembed",
    "memories_vec_on_deactivate",
    "memories_vec_on_reactivate",
    "memories_vec_on_delete",
)


def ensure_vec_table(conn: Connection, dim: int, *, chunk_size: int = CHUNK_SIZE) -> None:
    """Create the vec0 table for ``dim``-dimensional vectors and its triggers, if missing."""
    if _has_vec_table(conn):
        return
    bits = _padded(dim)
    conn.execute(
        "CREATE VIRTUAL TABLE memories_vec USING vec0("
        f"scope_id integer partition key, embedding bit[{bits}], chunk_size={int(chunk_size)})"
    )
    # Invariant: a vec0 row exists iff the memory is active and has a vector.
    for statement in (
        """CREATE TRIGGER memories_vec_on_embed AFTER INSERT ON embeddings BEGIN
            INSERT INTO memories_vec (rowid, scope_id, embedding)
            SELECT m.id, m.scope_id, vec_quantize_binary(new.vector)
            FROM memories m WHERE m.id = new.memory_id AND m.state = 'active';
        END""",
        """CREATE TRIGGER memories_vec_on_unembed AFTER DELETE ON embeddings BEGIN
            DELETE FROM memories_vec WHERE rowid = old.memory_id;
        END""",
        """CREATE TRIGGER memories_vec_on_deactivate AFTER UPDATE OF state ON memories
        WHEN old.state = 'active' AND new.state != 'active' BEGIN
            DELETE FROM memories_vec WHERE rowid = old.id;
        END""",
        """CREATE TRIGGER memories_vec_on_reactivate AFTER UPDATE OF state ON memories
        WHEN new.state = 'active' AND old.state != 'active' BEGIN
            INSERT INTO memories_vec (rowid, scope_id, embedding)
            SELECT new.id, new.scope_id, vec_quantize_binary(e.vector)
            FROM embeddings e WHERE e.memory_id = new.id;
        END""",
        """CREATE TRIGGER memories_vec_on_delete AFTER DELETE ON memories BEGIN
            DELETE FROM memories_vec WHERE rowid = old.id;
        END""",
    ):
        conn.execute(statement)


def _has_vec_table(conn: Connection) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'memories_vec'"
        ).fetchone()
        is not None
    )


def _padded(dim: int) -> int:
    return -(-dim // 8) * 8


def _unit_blob(vector: Sequence[float] | np.ndarray, dim: int) -> bytes:
    """The vector as unit-length float32, zero-padded to a multiple of 8, as bytes."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise ValueError(f"expected a {dim}-dimensional vector, got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise ValueError("vector has NaN or infinite values")
    norm = float(np.linalg.norm(v))
    out = np.zeros(_padded(dim), dtype=np.float32)
    if norm > 0:
        out[:dim] = v / norm
    return out.tobytes()


# -- writing vectors --------------------------------------------------------------


def store_vectors(
    conn: Connection,
    model_id: str,
    pairs: Iterable[tuple[int, Sequence[float] | np.ndarray]],
) -> int:
    """Store the vectors of memories (float blob + vec0 row) and mark them embedded.

    The first vector fixes the store's model and dimension. Vectors for memories
    that no longer exist are skipped (deleted while being embedded); an inactive
    memory keeps its vector but gets no vec0 row. Returns how many were stored.
    Raises EmbeddingModelMismatch if the store holds another model's vectors.
    """
    pairs = list(pairs)
    if not pairs:
        return 0
    current = embedding_model(conn)
    if current is None:
        dim = int(np.asarray(pairs[0][1]).reshape(-1).shape[0])
        set_meta(conn, _META_MODEL, model_id)
        set_meta(conn, _META_DIM, str(dim))
    elif current[0] != model_id:
        raise EmbeddingModelMismatch(
            f"the store holds vectors of {current[0]!r}, not {model_id!r}; "
            "call reset_vectors to switch models"
        )
    else:
        dim = current[1]
    ensure_vec_table(conn, dim)
    stored = 0
    for memory_id, vector in pairs:
        blob = _unit_blob(vector, dim)
        if not conn.execute("SELECT 1 FROM memories WHERE id = ?", (memory_id,)).fetchone():
            continue
        # Delete then insert so the triggers replace the vec0 row as well.
        conn.execute("DELETE FROM embeddings WHERE memory_id = ?", (memory_id,))
        conn.execute("INSERT INTO embeddings (memory_id, vector) VALUES (?, ?)", (memory_id, blob))
        conn.execute("UPDATE memories SET embedded = 1 WHERE id = ?", (memory_id,))
        stored += 1
    return stored


# -- searching --------------------------------------------------------------------


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
    if k <= 0 or model is None or not _has_vec_table(conn):
        return []
    query = _unit_blob(query_vec, model[1])
    candidates = min(max(k * oversample, k), MAX_K)
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT rowid FROM memories_vec WHERE embedding MATCH vec_quantize_binary(?)"
            " AND scope_id = ? AND k = ?",
            (query, scope_id, candidates),
        )
    ]
    if not ids:
        return []
    found_ids: list[int] = []
    blobs: list[bytes] = []
    for chunk in chunked(ids):
        # Re-checks scope and state: the vec0 table is trusted for speed, not for truth.
        for memory_id, blob in conn.execute(
            "SELECT e.memory_id, e.vector FROM embeddings e JOIN memories m ON m.id = e.memory_id"
            f" WHERE e.memory_id IN ({placeholders(chunk)})"
            " AND m.scope_id = ? AND m.state = 'active'",
            (*chunk, scope_id),
        ):
            found_ids.append(memory_id)
            blobs.append(blob)
    if not found_ids:
        return []
    matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    sims = matrix @ np.frombuffer(query, dtype=np.float32)
    top = np.argsort(-sims, kind="stable")[:k]
    return [VectorHit(found_ids[i], float(sims[i])) for i in top]


def keyword_search(conn: Connection, scope_id: int, query_text: str, k: int) -> list[KeywordHit]:
    """The ``k`` active memories of the scope that best match the words of ``query_text``
    (BM25), best first. Any text is safe: it is reduced to quoted words, OR-ed."""
    expression = match_expression(query_text)
    if expression is None or k <= 0:
        return []
    rows = conn.execute(
        "SELECT rowid, rank FROM memories_fts WHERE memories_fts MATCH ? ORDER BY rank LIMIT ?",
        (f'scope : "s{int(scope_id)}" AND text : ({expression})', k),
    ).fetchall()
    if not rows:
        return []
    ids = [r[0] for r in rows]
    live = {
        r[0]
        for r in conn.execute(
            f"SELECT id FROM memories WHERE id IN ({placeholders(ids)})"
            " AND scope_id = ? AND state = 'active'",
            (*ids, scope_id),
        )
    }
    return [KeywordHit(memory_id, -rank) for memory_id, rank in rows if memory_id in live]


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
MAX_TERMS = 24
_WORD = re.compile(r"\w+", re.UNICODE)


def match_expression(text: str) -> str | None:
    """A safe FTS5 MATCH expression for free text: its distinct words, quoted, OR-ed.

    Operators (AND, NEAR, ``*``, ``^``, quotes, parentheses, column filters) are
    dropped with the punctuation; stopwords are dropped unless nothing else is left;
    long texts keep their ``MAX_TERMS`` longest words. None when no word is left.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text or "")))
    words = [w for w in words if w.strip("_")]
    kept = [w for w in words if w not in STOPWORDS] or words
    if len(kept) > MAX_TERMS:
        longest = set(sorted(kept, key=len, reverse=True)[:MAX_TERMS])
        kept = [w for w in kept if w in longest][:MAX_TERMS]
    if not kept:
        return None
    # \w+ never contains a double quote, so quoting is enough to make each a phrase.
    return " OR ".join(f'"{w}"' for w in kept)
