"""Vectors and search: a bit-packed KNN scan with re-scoring, and FTS5 keyword search.

Vector layout (numbers from bench/knn.py, real MiniLM vectors):
- ``embeddings(memory_id, vector, pack, slot)``: each memory's unit float32 vector,
  zero-padded to a multiple of 8 dimensions (padding changes no dot product).
- ``vector_packs(scope_id, ids, bits, dirty)``: the sign bits of the active
  memories' vectors, packed per scope in blobs of up to ``PACK_SIZE`` entries.
- ``knn`` reads the scope's packs (a few blobs, not one row per memory), ranks every
  entry by Hamming distance in numpy, re-scores the best ``k * OVERSAMPLE`` with their
  vectors, and returns the best ``k`` with their cosine similarities (higher = more
  similar). The vectors come from a cache the readers of a database share: float32
  (exact) for scopes up to ``FLOAT_CACHE_ENTRIES``, float16 (within ~1e-3) up to
  ``HALF_CACHE_ENTRIES``; larger scopes re-score with sqlite-vec's
  ``vec_distance_cosine`` over the stored float32 vectors.

Why not a sqlite-vec ``vec0`` bit table: its KNN (0.1.9) selects the top k of each
chunk in O(k * n), so the oversampled k that bit quantization needs is what costs:
at 100k rows in one partition, k=10 took 5.8 ms and k=120 took 19.9 ms, where this
whole search (scan + re-scoring) took 3.4 ms of CPU (bench/knn.py, busy machine).
Packs also cost no space per scope, where each vec0 partition reserves a chunk.

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

import contextlib
import functools
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from proxy.memory.db import Connection, StoreError
from proxy.memory.records import chunked, placeholders, set_meta

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
    # One query, not two: every search asks.
    found = dict(
        conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", (_META_MODEL, _META_DIM))
    )
    model, dim = found.get(_META_MODEL), found.get(_META_DIM)
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


def _hamming(columns: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distances of each entry to ``query``; ``columns`` holds the entries'
    64-bit words column-major (shape words x entries), which numpy scans fastest."""
    bitwise_count = getattr(np, "bitwise_count", None)  # numpy >= 2.0

    def popcount(words: np.ndarray) -> np.ndarray:
        if bitwise_count is not None:
            return bitwise_count(words)
        return _POPCOUNT8[words.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.uint8)

    total = popcount(columns[0] ^ query[0]).astype(np.int32)
    for row in range(1, columns.shape[0]):
        total += popcount(columns[row] ^ query[row])
    return total


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
        conn.execute(
            "UPDATE vector_packs SET ids = ?, bits = ?, version = version + 1 WHERE id = ?",
            (ids, bits, pack_id),
        )
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
            "UPDATE vector_packs SET ids = ?, bits = ?, dirty = 0, version = version + 1"
            " WHERE id = ?",
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
            f" WHERE e.pack IN ({placeholders(pack_ids)}) AND +m.state = 'active'",
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

    Similarities are cosines: exact, or within ~1e-3 for a scope whose cached vectors
    are float16 (see the module's docstring). An empty list when nothing is embedded yet.
    """
    return QuerySearch(conn, scope_id, query_vec).knn(k, oversample=oversample)


def similarities(
    conn: Connection,
    scope_id: int,
    memory_ids: Sequence[int],
    query_vec: Sequence[float] | np.ndarray,
) -> dict[int, float]:
    """Cosine similarity to the query of those of `memory_ids` that have a vector (any
    state). The scope's cached vectors serve what they hold (float16 ones within ~1e-3);
    SQLite the rest, exactly."""
    return QuerySearch(conn, scope_id, query_vec).similarities(memory_ids)


class QuerySearch:
    """The vector searches of one query in one scope, within one read (`knn`,
    `similarities`): the store's model and the scope's packs are read once for all."""

    def __init__(
        self, conn: Connection, scope_id: int, query_vec: Sequence[float] | np.ndarray
    ) -> None:
        self.conn = conn
        self.scope_id = scope_id
        model = embedding_model(conn)
        self.query = _unit(query_vec, model[1]) if model is not None else None
        self.packs = _packs(conn, scope_id) if model is not None else []
        self.loaded = (
            _scope_bits(conn, scope_id, tuple((p[0], p[1]) for p in self.packs), len(self.query))
            if self.packs and self.query is not None
            else None
        )

    def knn(self, k: int, *, oversample: int = OVERSAMPLE) -> list[VectorHit]:
        """See the module function `knn`."""
        conn, loaded, query = self.conn, self.loaded, self.query
        if k <= 0 or loaded is None or query is None or len(loaded.ids) == 0:
            return []
        ids, columns = loaded.ids, loaded.columns
        qbits = np.frombuffer(_sign_bits(query), dtype="<u8")
        if columns.shape[0] != len(qbits):
            raise StoreError("stored vectors do not match the store's dimension; reset_vectors")
        distances = _hamming(columns, qbits)
        stale_distance = columns.shape[0] * 64 + 1  # past any true distance: never a hit
        dirty = [(p[0], p[1]) for p in self.packs if p[2]]
        if dirty:  # mask entries that went stale since the last compaction
            live = np.fromiter((m for _, _, m in _live_slots(conn, [p for p, _ in dirty])), "<i8")
            for key in dirty:
                start, stop = loaded.spans[key]
                stale = ~np.isin(ids[start:stop], live)
                distances[start:stop][stale] = stale_distance
        nearest = _nearest(distances, max(k * oversample, k), stale_distance)
        hits = _rescored(conn, self.scope_id, loaded, nearest, query, k)
        if len(hits) < k:  # candidates turned out inactive (never, normally): all the rest
            rest = np.setdiff1d(np.flatnonzero(distances < stale_distance), nearest)
            hits += _rescored(conn, self.scope_id, loaded, rest, query, k)
        hits.sort(key=lambda h: -h.similarity)
        return hits[:k]

    def similarities(self, memory_ids: Sequence[int]) -> dict[int, float]:
        """See the module function `similarities`."""
        query, loaded = self.query, self.loaded
        if not memory_ids or query is None:
            return {}
        out: dict[int, float] = {}
        rest = list(memory_ids)
        if loaded is not None and loaded.floats is not None:
            positions = loaded.positions()
            found = [(m, positions[m]) for m in rest if m in positions]
            if found:
                entries = np.fromiter((i for _, i in found), dtype=np.int64, count=len(found))
                sims = _cached_sims(loaded, entries, query)
                out = {m: float(x) for (m, _), x in zip(found, sims, strict=True)}
                rest = [m for m in rest if m not in out]
        found_ids: list[int] = []
        blobs: list[bytes] = []
        for chunk in chunked(rest):
            for memory_id, blob in self.conn.execute(
                "SELECT memory_id, vector FROM embeddings"
                f" WHERE memory_id IN ({placeholders(chunk)})",
                chunk,
            ):
                if len(blob) == len(query) * 4:
                    found_ids.append(memory_id)
                    blobs.append(blob)
        if found_ids:
            matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found_ids), -1)
            out.update(zip(found_ids, (float(x) for x in matrix @ query), strict=True))
        return out


def warm(conn: Connection, scope_ids: Iterable[int]) -> None:
    """Bring the scopes' packed entries, vectors and positions into the readers' cache
    now, off any request's path: a write (the background embedding of a turn) changes
    a scope's packs, and the next search would rebuild its entry while a user waits
    (~2.5 ms a request at 10k memories when every turn is stored, bench/memory.py
    --write)."""
    model = embedding_model(conn)
    if model is None:
        return
    for scope_id in scope_ids:
        loaded = QuerySearch(conn, scope_id, np.zeros(model[1], dtype=np.float32)).loaded
        if loaded is not None:
            loaded.positions()


def _nearest(distances: np.ndarray, wanted: int, stale_distance: int) -> np.ndarray:
    """The `wanted` entries of least distance (fewer if fewer are live), in entry order.

    Distances are small integers, so a histogram finds the cut-off distance in one pass
    where a partial sort of 100k entries took ~0.5 ms.
    """
    counts = np.cumsum(np.bincount(distances, minlength=stale_distance + 1)[:stale_distance])
    wanted = min(wanted, int(counts[-1]))
    if wanted <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = int(np.searchsorted(counts, wanted))  # least d with `wanted` entries at <= d
    inside = np.flatnonzero(distances < cut)
    ties = np.flatnonzero(distances == cut)[: wanted - len(inside)]
    return np.sort(np.concatenate([inside, ties]))


def _rescored(
    conn: Connection,
    scope_id: int,
    loaded: _ScopeBits,
    entries: np.ndarray,
    query: np.ndarray,
    k: int,
) -> list[VectorHit]:
    """The best `k` of `entries` by their true similarity (cached vectors, else SQLite)."""
    if not len(entries):
        return []
    if loaded.floats is None:
        return _rescore(conn, scope_id, loaded.ids[entries].tolist(), query)
    sims = _cached_sims(loaded, entries, query)
    if len(sims) > k:  # the caller keeps k in all: build no more hits than that
        best = np.argpartition(-sims, k - 1)[:k]
        entries, sims = entries[best], sims[best]
    return [
        VectorHit(int(memory_id), float(sim))
        for memory_id, sim in zip(loaded.ids[entries], sims, strict=True)
    ]


def _packs(conn: Connection, scope_id: int) -> list[tuple[int, int, int]]:
    """(id, version, dirty) of the scope's packs, in order."""
    return conn.execute(
        "SELECT id, version, dirty FROM vector_packs WHERE scope_id = ? ORDER BY id", (scope_id,)
    ).fetchall()


class _Chunk(NamedTuple):
    """The cached vectors of a run of consecutive packs, in one array."""

    packs: tuple[tuple[int, int], ...]  # (pack id, version) of each pack in the run
    start: int  # its first entry among the scope's entries
    rows: np.ndarray  # one row per entry (zero for an entry without a vector)


def _scope_floats(
    conn: Connection, loaded: _ScopeBits, old: _ScopeBits | None, width: int, dtype: type
) -> list[_Chunk]:
    """The vectors of `loaded`'s entries as `dtype`, in chunks of `CHUNK_PACKS` packs.

    A chunk whose packs `old` (the scope's previous cache entry) holds unchanged is
    shared with it; a changed chunk copies its unchanged packs from `old` and reads only
    the others from SQLite: after a write, one pack is read and one chunk copied.
    """
    shared: dict[tuple[tuple[int, int], ...], _Chunk] = {}
    known: dict[tuple[int, int], np.ndarray] = {}  # pack -> its rows in `old`
    previous = old.floats if old is not None and old.floats else []
    for chunk in previous:
        if chunk.rows.dtype != dtype or chunk.rows.shape[1] != width:
            continue
        shared[chunk.packs] = chunk
        for key in chunk.packs:
            lo, hi = old.spans[key]  # type: ignore[union-attr]  # previous is old's
            known[key] = chunk.rows[lo - chunk.start : hi - chunk.start]
    chunks: list[_Chunk] = []
    keys = list(loaded.signature)
    for i in range(0, len(keys), CHUNK_PACKS):
        packs = tuple(keys[i : i + CHUNK_PACKS])
        start, stop = loaded.spans[packs[0]][0], loaded.spans[packs[-1]][1]
        same = shared.get(packs)
        if same is not None and len(same.rows) == stop - start:
            chunks.append(_Chunk(packs, start, same.rows))
            continue
        rows = np.zeros((stop - start, width), dtype=dtype)
        for key in packs:
            lo, hi = loaded.spans[key]
            before = known.get(key)
            if before is not None and len(before) == hi - lo:
                rows[lo - start : hi - start] = before
                continue
            for slot, blob in conn.execute(
                "SELECT slot, vector FROM embeddings WHERE pack = ?", (key[0],)
            ):
                if 0 <= slot < hi - lo and len(blob) == width * 4:
                    rows[lo - start + slot] = np.frombuffer(blob, dtype=np.float32)
        chunks.append(_Chunk(packs, start, rows))
    return chunks


class _ScopeBits:
    """A scope's packed entries as of one set of pack versions (the readers' cache)."""

    __slots__ = ("_positions", "columns", "floats", "ids", "signature", "spans")

    def __init__(
        self,
        signature: tuple[tuple[int, int], ...],
        ids: np.ndarray,
        columns: np.ndarray,
        spans: dict[tuple[int, int], tuple[int, int]],
    ) -> None:
        self.signature = signature  # ((pack id, version), ...) in pack order
        self.ids = ids  # memory ids, one per entry
        self.columns = columns  # sign bits: 64-bit words x entries (column-major)
        self.spans = spans  # (pack id, version) -> (start, stop) among the entries
        self._positions: dict[int, int] | None = None
        # The entries' vectors in chunks of packs (rows in entry order): float32 up to
        # FLOAT_CACHE_ENTRIES entries, float16 up to HALF_CACHE_ENTRIES, none above.
        self.floats: list[_Chunk] | None = None

    def positions(self) -> dict[int, int]:
        """Memory id -> its entry (the newest, should a stale one remain), built once."""
        if self._positions is None:
            self._positions = dict(zip(self.ids.tolist(), range(len(self.ids)), strict=True))
        return self._positions

    @property
    def nbytes(self) -> int:
        floats = sum(c.rows.nbytes for c in self.floats) if self.floats else 0
        return int(self.ids.nbytes + self.columns.nbytes + floats)


# The packed bits (and vectors) of recently searched scopes, shared by the reader
# connections of one database (per connection otherwise), so that a search reads only
# the packs that changed since the last one (a pack's (id, version) never names two
# committed contents: ids are AUTOINCREMENT, every rewrite bumps the version).
CACHE_BYTES = 256 * 1024 * 1024
# A scope of at most this many entries keeps its float32 vectors in the cache (~1.5 KB
# each): re-scoring the Hamming candidates from memory instead of reading ~k*OVERSAMPLE
# vectors from SQLite halves recall's time at 1k-10k memories (bench/memory.py).
FLOAT_CACHE_ENTRIES = 20_000
# A larger scope keeps them as float16 (768 bytes each: ~77 MB at 100k), up to this
# many entries: at 100k memories reading the candidates' vectors from SQLite took ~7 ms
# of recall's ~10 (bench/memory.py). Similarities are then within ~1e-3 of exact.
HALF_CACHE_ENTRIES = 200_000
# Cached vectors live in arrays of this many packs (~8k entries): few enough arrays to
# gather candidates from quickly, small enough that a write copies little.
CHUNK_PACKS = 16


class _ScopeCache(OrderedDict[int, _ScopeBits]):
    """Scope id -> its cached entries, least recently used first; `lock` guards the
    dictionary (entries are immutable once built, and built outside the lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


_SHARED: weakref.WeakValueDictionary[str, _ScopeCache] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _cache_of(conn: Connection) -> _ScopeCache:
    cache = getattr(conn, "_mnemo_vector_cache", None)
    if cache is None:
        key = getattr(conn, "_mnemo_shared_key", None)  # set on readers by open_connection
        with _SHARED_LOCK:
            cache = _SHARED.get(key) if key else None
            if cache is None:
                cache = _ScopeCache()
                if key:
                    _SHARED[key] = cache
        # Connections from db.open_connection take attributes; others are not cached.
        with contextlib.suppress(AttributeError):
            conn._mnemo_vector_cache = cache
    return cache


def _scope_bits(
    conn: Connection, scope_id: int, signature: tuple[tuple[int, int], ...], width: int
) -> _ScopeBits:
    """The scope's entries for these pack versions, reading only packs not cached;
    `width` is the stored vectors' (the dimension padded to a multiple of 8)."""
    cache = _cache_of(conn)
    with cache.lock:
        old = cache.get(scope_id)
        if old is not None and old.signature == signature:
            cache.move_to_end(scope_id)
            return old
    known = old.spans if old is not None else {}
    fetched: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for chunk in chunked([pack for pack, version in signature if (pack, version) not in known]):
        for pack, version, ids_blob, bits_blob in conn.execute(
            f"SELECT id, version, ids, bits FROM vector_packs WHERE id IN ({placeholders(chunk)})",
            chunk,
        ):
            ids = np.frombuffer(ids_blob, dtype="<i8")
            words = len(bits_blob) // 8 // max(len(ids), 1)
            bits = np.frombuffer(bits_blob, "<u8").reshape(len(ids), words).T
            fetched[(pack, version)] = (ids, bits)
    id_parts, bit_parts, spans, start = [], [], {}, 0
    for key in signature:
        if key in fetched:
            ids, bits = fetched[key]
        else:
            assert old is not None
            lo, hi = known[key]
            ids, bits = old.ids[lo:hi], old.columns[:, lo:hi]
        spans[key] = (start, start + len(ids))
        start += len(ids)
        if len(ids):
            id_parts.append(ids)
            bit_parts.append(bits)
    if not id_parts:
        return _ScopeBits(signature, np.zeros(0, "<i8"), np.zeros((0, 0), "<u8"), spans)
    if len({b.shape[0] for b in bit_parts}) > 1:
        raise StoreError("stored vectors have mixed dimensions; reset_vectors")
    loaded = _ScopeBits(
        signature,
        np.concatenate(id_parts),
        np.ascontiguousarray(np.concatenate(bit_parts, axis=1)),
        spans,
    )
    if len(loaded.ids) <= HALF_CACHE_ENTRIES:
        half = len(loaded.ids) > FLOAT_CACHE_ENTRIES
        loaded.floats = _scope_floats(conn, loaded, old, width, np.float16 if half else np.float32)
    with cache.lock:
        cache[scope_id] = loaded
        cache.move_to_end(scope_id)
        total = sum(entry.nbytes for entry in cache.values())
        while total > CACHE_BYTES and len(cache) > 1:
            total -= cache.popitem(last=False)[1].nbytes
    return loaded


def _cached_sims(loaded: _ScopeBits, entries: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Dot products of the query with the cached vectors of `entries` (indices among the
    scope's entries), in the order given."""
    assert loaded.floats is not None
    sims = np.zeros(len(entries), dtype=np.float32)
    if not len(entries) or not loaded.floats:
        return sims
    # Visit the chunks in entry order, each with the run of sorted entries inside it,
    # and convert all gathered rows at once.
    order = np.argsort(entries, kind="stable")
    ordered = entries[order]
    bounds = np.searchsorted(ordered, [c.start for c in loaded.floats]).tolist()
    parts = [
        chunk.rows[ordered[lo:hi] - chunk.start]
        for chunk, lo, hi in zip(loaded.floats, bounds, [*bounds[1:], len(ordered)], strict=True)
        if hi > lo
    ]
    rows = np.concatenate(parts)
    if rows.dtype == np.float16:
        rows = np.take(_half_to_float(), rows.view(np.uint16))
    sims[order] = rows @ query
    return sims


@functools.cache
def _half_to_float() -> np.ndarray:
    """Every float16 bit pattern's float32 value. Widening by table lookup is exact,
    and took 0.35 ms for the 720 vectors a search re-scores where numpy's astype took
    0.6 ms on this project's machine (numpy converts float16 one value at a time)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _rescore(
    conn: Connection, scope_id: int, memory_ids: list[int], query: np.ndarray
) -> list[VectorHit]:
    """Exact cosine of the active memories of the scope among ``memory_ids``, computed
    by sqlite-vec (``vec_distance_cosine``) next to the stored float32 vectors."""
    hits: list[VectorHit] = []
    blob = query.tobytes()
    for chunk in chunked(memory_ids):
        hits += [
            # A zero vector has no direction: sqlite-vec says NULL, we say 0.
            VectorHit(memory_id, 0.0 if distance is None else 1.0 - distance)
            for memory_id, distance in conn.execute(
                "SELECT e.memory_id, vec_distance_cosine(e.vector, ?) FROM embeddings e"
                " JOIN memories m ON m.id = e.memory_id"
                f" WHERE e.memory_id IN ({placeholders(chunk)})"
                " AND +m.scope_id = ? AND +m.state = 'active'",  # ids first: see placeholders()
                (blob, *chunk, scope_id),
            )
        ]
    return hits


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
            " AND +scope_id = ? AND +state = 'active'",
            (*ids, scope_id),
        )
    }
    return [
        KeywordHit(memory_id, -rank)
        for memory_id, (_, rank) in zip(ids, rows, strict=True)
        if memory_id in live
    ]


# Document counts only steer which words to keep, so a count up to this old will do.
POSTINGS_TTL_S = 60.0


class _TermCache:
    """Per connection: how FTS5 stems each word, and recent document counts."""

    __slots__ = ("postings", "stems")

    def __init__(self) -> None:
        self.stems: dict[str, tuple[str, ...]] = {}
        self.postings: dict[str, tuple[int, float]] = {}  # term -> (count, when)


def _term_cache(conn: Connection) -> _TermCache:
    cache = getattr(conn, "_mnemo_term_cache", None)
    if cache is None or len(cache.stems) + len(cache.postings) > 50_000:
        cache = _TermCache()
        with contextlib.suppress(AttributeError):  # see _cache_of
            conn._mnemo_term_cache = cache
    return cache


def _stems(conn: Connection, cache: _TermCache, words: list[str]) -> dict[str, tuple[str, ...]]:
    """The index terms of each word, stemmed by FTS5 itself (in a connection-private
    temp table), so that they match the terms of ``memories_fts``."""
    new = [w for w in words if w not in cache.stems]
    if new:
        conn.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5 ("
            "word, tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        conn.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms"
            " USING fts5vocab (temp, query_words, 'instance')"
        )
        conn.executemany("INSERT INTO temp.query_words (rowid, word) VALUES (?, ?)", enumerate(new))
        try:
            found: dict[str, list[str]] = {w: [] for w in new}
            for index, term in conn.execute("SELECT doc, term FROM temp.query_terms"):
                found[new[index]].append(term)
        finally:
            conn.execute("DELETE FROM temp.query_words")
        for word, terms in found.items():
            cache.stems[word] = tuple(terms)
    return {w: cache.stems[w] for w in words}


def _rarest(conn: Connection, words: list[str]) -> list[str]:
    """The words that occur in the index, rarest first, within the postings budget."""
    cache = _term_cache(conn)
    now = time.monotonic()
    counted: dict[str, int] = {}
    for word, terms in _stems(conn, cache, words).items():
        for term in terms:
            known = cache.postings.get(term)
            if known is None or now - known[1] > POSTINGS_TTL_S:
                row = conn.execute(
                    "SELECT doc FROM memories_fts_vocab WHERE term = ?", (term,)
                ).fetchone()
                known = (row[0] if row else 0, now)
                if known[0]:  # an absent term is asked again: it may be new next time
                    cache.postings[term] = known
            if known[0]:  # a word may stem to several terms: count its most common one
                counted[word] = max(counted.get(word, 0), known[0])
    kept: list[str] = []
    total = 0
    for word, postings in sorted(counted.items(), key=lambda item: item[1]):
        if kept and total + postings > POSTINGS_BUDGET:
            break
        kept.append(word)
        total += postings
    return kept
