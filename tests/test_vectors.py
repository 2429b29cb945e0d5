"""Vector KNN (sqlite-vec bits + exact re-scoring) and FTS5 keyword search."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from proxy.memory import records, vectors
from proxy.memory.db import Connection, open_connection
from proxy.memory.records import NewMemory, NewMessage
from proxy.memory.store import Store
from proxy.memory.vectors import EmbeddingModelMismatch

DIM = 384
MODEL = "fake-model"


def fake_vec(text: str, dim: int = DIM) -> np.ndarray:
    """A deterministic unit vector for a text (unrelated texts are near-orthogonal)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, amount: float, salt: str) -> np.ndarray:
    """A vector close to ``v`` (smaller ``amount`` = closer)."""
    w = v + amount * fake_vec(salt, len(v))
    return w / np.linalg.norm(w)


@pytest.fixture(
    autouse=True, params=["float32 cached", "float16 cached", "floats read from SQLite"]
)
def rescoring(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with each way of re-scoring KNN candidates: from the readers'
    cache of a small scope's vectors (float32) or a large one's (float16), and from
    SQLite (the largest scopes)."""
    if request.param != "float32 cached":
        monkeypatch.setattr(vectors, "FLOAT_CACHE_ENTRIES", 0)
    if request.param == "floats read from SQLite":
        monkeypatch.setattr(vectors, "HALF_CACHE_ENTRIES", 0)


@pytest.fixture
def tolerance(request: pytest.FixtureRequest) -> float:
    """How close a similarity is to the exact cosine: float16 vectors are within 1e-3."""
    return 1e-3 if "float16" in request.node.callspec.params["rescoring"] else 1e-5


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open_sync(tmp_path / "memory.db") as s:
        yield s


def _scope(store: Store, name: str) -> int:
    return store.write_sync(records.get_or_create_scope, "", name, None, 1.0).id


def _add(
    store: Store, scope_id: int, texts: list[str], vecs: list[np.ndarray] | None = None
) -> list[int]:
    ids = store.write_sync(
        records.insert_memories, [NewMemory(scope_id, "turn", t, 1.0) for t in texts], 1.0
    )
    vecs = vecs if vecs is not None else [fake_vec(t) for t in texts]
    store.write_sync(vectors.store_vectors, MODEL, zip(ids, vecs, strict=True))
    return ids


def _pack_entries(conn: Connection) -> int:
    return conn.execute("SELECT coalesce(sum(length(ids)), 0) / 8 FROM vector_packs").fetchone()[0]


# -- knn ---------------------------------------------------------------------------


def test_knn_is_exact_for_small_scopes(store: Store, tolerance: float) -> None:
    scope = _scope(store, "chat")
    texts = [f"memory {i}" for i in range(60)]
    vecs = [fake_vec(t) for t in texts]
    ids = _add(store, scope, texts, vecs)
    query = near(vecs[7], 0.8, "q")
    hits = store.read_sync(vectors.knn, scope, query, 10)
    sims = np.stack(vecs) @ query
    expected = np.argsort(-sims)[:10]
    assert [h.memory_id for h in hits] == [ids[i] for i in expected]
    exact = [float(sims[i]) for i in expected]
    assert [h.similarity for h in hits] == pytest.approx(exact, abs=tolerance)
    assert hits[0].memory_id == ids[7]


def test_knn_finds_near_neighbours_in_a_larger_scope(store: Store) -> None:
    scope = _scope(store, "chat")
    anchor = fake_vec("anchor")
    close = [near(anchor, 0.3 + 0.05 * i, f"close{i}") for i in range(5)]
    noise = [fake_vec(f"noise {i}") for i in range(2000)]
    ids = _add(
        store, scope, [f"c{i}" for i in range(5)] + [f"n{i}" for i in range(2000)], close + noise
    )
    hits = store.read_sync(vectors.knn, scope, anchor, 5)
    assert [h.memory_id for h in hits] == ids[:5]
    assert all(h.similarity > 0.8 for h in hits)


def test_knn_never_returns_another_scopes_memories(store: Store) -> None:
    mine, theirs = _scope(store, "mine"), _scope(store, "theirs")
    query = fake_vec("the secret")
    _add(store, theirs, ["the secret"], [query])  # identical vector, other scope
    own = _add(store, mine, [f"mine {i}" for i in range(20)])
    hits = store.read_sync(vectors.knn, mine, query, 50)
    assert {h.memory_id for h in hits} == set(own)
    assert store.read_sync(vectors.knn, _scope(store, "empty"), query, 5) == []


def test_retracted_and_superseded_never_come_back(store: Store) -> None:
    scope = _scope(store, "chat")
    query = fake_vec("q")
    texts = [f"about the lighthouse {i}" for i in range(30)]
    vecs = [near(query, 0.2 + 0.1 * i, t) for i, t in enumerate(texts)]
    ids = _add(store, scope, texts, vecs)
    nearest = ids[:20]
    store.write_sync(records.retract_memories, scope, nearest[:10])
    for old in nearest[10:20]:
        store.write_sync(records.supersede_memory, scope, old, ids[-1])
    hits = store.read_sync(vectors.knn, scope, query, 5)
    # The inactive ones took no KNN slots: the five nearest active ones come back.
    active = np.stack(vecs[20:]) @ query
    assert [h.memory_id for h in hits] == [ids[20 + i] for i in np.argsort(-active)[:5]]
    words = store.read_sync(vectors.keyword_search, scope, "lighthouse", 50)
    assert {h.memory_id for h in words} == set(ids[20:])
    # Compaction drops the stale entries from the packs for good.
    assert store.read_sync(_pack_entries) == 30
    assert store.write_sync(vectors.compact_vectors) >= 1
    assert store.read_sync(_pack_entries) == 10
    assert [h.memory_id for h in store.read_sync(vectors.knn, scope, query, 5)] == [
        h.memory_id for h in hits
    ]


def test_undone_messages_take_their_memories_out_of_search(store: Store) -> None:
    scope = _scope(store, "chat")
    msgs = store.write_sync(
        records.append_messages,
        scope,
        [
            NewMessage("user", "I live in Porto", "a", 1.0),
            NewMessage("assistant", "Nice", "b", 2.0),
        ],
        None,
    )
    (mem,) = store.write_sync(
        records.insert_memories,
        [NewMemory(scope, "fact", "lives in Porto", 1.0, sources=msgs)],
        1.0,
    )
    store.write_sync(vectors.store_vectors, MODEL, [(mem, fake_vec("porto"))])
    assert store.read_sync(vectors.knn, scope, fake_vec("porto"), 3)[0].memory_id == mem
    assert store.write_sync(records.undo_messages, scope, msgs, 3.0) == [mem]
    assert store.read_sync(vectors.knn, scope, fake_vec("porto"), 3) == []
    assert store.read_sync(vectors.keyword_search, scope, "Porto", 3) == []


def test_a_reactivated_memory_is_searchable_again(store: Store) -> None:
    scope = _scope(store, "chat")
    (mem,) = _add(store, scope, ["the blue door"])
    store.write_sync(records.retract_memories, scope, [mem])
    store.write_sync(
        lambda c: c.execute("UPDATE memories SET state = 'active' WHERE id = ?", (mem,))
    )
    assert store.read_sync(vectors.keyword_search, scope, "door", 1)[0].memory_id == mem
    # Its vector is queued again (the worker re-embeds it), then it is found.
    assert [m.id for m in store.read_sync(records.memories_to_embed, 10)] == [mem]
    store.write_sync(vectors.store_vectors, MODEL, [(mem, fake_vec("the blue door"))])
    assert store.read_sync(vectors.knn, scope, fake_vec("the blue door"), 1)[0].memory_id == mem


def test_edited_text_drops_the_old_vector_until_re_embedded(store: Store) -> None:
    scope = _scope(store, "chat")
    (mem,) = _add(store, scope, ["likes tea"])
    assert store.write_sync(records.update_memory_text, scope, mem, "likes coffee")
    assert store.read_sync(vectors.knn, scope, fake_vec("likes tea"), 3) == []
    assert [m.id for m in store.read_sync(records.memories_to_embed, 10)] == [mem]
    assert store.read_sync(vectors.keyword_search, scope, "tea", 3) == []
    assert store.read_sync(vectors.keyword_search, scope, "coffee", 3)[0].memory_id == mem
    store.write_sync(vectors.store_vectors, MODEL, [(mem, fake_vec("likes coffee"))])
    assert store.read_sync(vectors.knn, scope, fake_vec("likes coffee"), 1)[0].memory_id == mem
    assert store.read_sync(records.memories_to_embed, 10) == []


def test_similarities_are_exact_for_every_memory_with_a_vector(
    store: Store, tolerance: float
) -> None:
    scope = _scope(store, "chat")
    query = fake_vec("q")
    texts = [f"turn {i}" for i in range(40)]
    vecs = [near(query, 0.1 * i, t) for i, t in enumerate(texts)]
    ids = _add(store, scope, texts, vecs)
    store.read_sync(vectors.knn, scope, query, 5)  # the scope is now in the reader's cache
    store.write_sync(records.retract_memories, scope, ids[:3])  # stale entries, same vectors
    (unembedded,) = store.write_sync(
        records.insert_memories, [NewMemory(scope, "turn", "not embedded yet", 1.0)], 1.0
    )
    wanted = [*ids[::-1], unembedded]
    sims = store.read_sync(vectors.similarities, scope, wanted, query)
    assert set(sims) == set(ids)  # no vector, no similarity
    for memory_id, vec in zip(ids, vecs, strict=True):
        assert sims[memory_id] == pytest.approx(float(vec @ query), abs=tolerance)
    assert store.read_sync(vectors.similarities, scope, [], query) == {}


def test_vectors_for_deleted_or_inactive_memories(store: Store) -> None:
    scope = _scope(store, "chat")
    gone, retracted = store.write_sync(
        records.insert_memories,
        [NewMemory(scope, "turn", "a", 1.0), NewMemory(scope, "turn", "b", 1.0)],
        1.0,
    )
    store.write_sync(records.delete_memory, scope, gone)
    store.write_sync(records.retract_memories, scope, [retracted])
    stored = store.write_sync(
        vectors.store_vectors, MODEL, [(gone, fake_vec("a")), (retracted, fake_vec("b"))]
    )
    assert stored == 1  # the deleted one is skipped, the retracted one keeps a vector
    assert store.read_sync(vectors.knn, scope, fake_vec("b"), 3) == []


def test_odd_dimensions_and_zero_vectors(store: Store, tolerance: float) -> None:
    scope = _scope(store, "chat")
    vecs = [fake_vec(f"v{i}", 10) for i in range(5)] + [np.zeros(10, dtype=np.float32)]
    ids = store.write_sync(
        records.insert_memories, [NewMemory(scope, "turn", f"v{i}", 1.0) for i in range(6)], 1.0
    )
    store.write_sync(vectors.store_vectors, MODEL, zip(ids, vecs, strict=True))
    hits = store.read_sync(vectors.knn, scope, vecs[2], 6)
    assert hits[0].memory_id == ids[2] and hits[0].similarity == pytest.approx(1.0, abs=tolerance)
    assert len(hits) == 6
    with pytest.raises(ValueError, match="10-dimensional"):
        store.read_sync(vectors.knn, scope, fake_vec("x", 12), 3)


# -- the embedding model -----------------------------------------------------------


def test_model_change_resets_vectors_and_requeues_everything(store: Store) -> None:
    scope = _scope(store, "chat")
    assert not store.write_sync(vectors.ensure_embedding_model, MODEL, DIM)
    assert not store.write_sync(vectors.ensure_embedding_model, MODEL, DIM)
    ids = _add(store, scope, ["one", "two", "three"])
    assert store.read_sync(records.memories_to_embed, 10) == []
    with pytest.raises(EmbeddingModelMismatch):
        store.write_sync(vectors.store_vectors, "other-model", [(ids[0], fake_vec("x", 8))])
    # A new model (with another dimension) at the next start:
    assert store.write_sync(vectors.ensure_embedding_model, "other-model", 16)
    assert store.read_sync(vectors.embedding_model) == ("other-model", 16)
    assert [m.id for m in store.read_sync(records.memories_to_embed, 10)] == ids
    assert store.read_sync(vectors.knn, scope, fake_vec("one", 16), 3) == []
    store.write_sync(
        vectors.store_vectors,
        "other-model",
        [(i, fake_vec(t, 16)) for i, t in zip(ids, ["one", "two", "three"], strict=True)],
    )
    assert store.read_sync(vectors.knn, scope, fake_vec("two", 16), 1)[0].memory_id == ids[1]


# -- keyword search ----------------------------------------------------------------

HOSTILE = [
    "",
    "   ",
    '"',
    '""',
    "'",
    "*",
    "a*",
    "^start",
    "NEAR(cat dog)",
    "cat NEAR dog",
    "AND OR NOT",
    "(",
    ")",
    "text: cat",
    "scope:s1",
    '{scope text}: "s1"',
    "- cat",
    "+ cat",
    "cat:*",
    "🙂🔥🐈",
    "cat🐈dog",
    "'; DROP TABLE memories; --",
    "\x00\x01",
    "\\",
    "東京 タワー",
    "café naïve",
    "the",
    "x" * 5000,
    " ".join(f"word{i}" for i in range(500)),
]


@pytest.mark.parametrize("query", HOSTILE)
def test_keyword_search_survives_hostile_input(store: Store, query: str) -> None:
    scope = _scope(store, "chat")
    other = _scope(store, "other")
    _add(store, scope, ["the cat and the dog", "Tokyo: 東京 タワー", "un café naïve"])
    secret = _add(store, other, ["s1 scope secret cat"])
    hits = store.read_sync(vectors.keyword_search, scope, query, 10)
    assert isinstance(hits, list)
    assert not {h.memory_id for h in hits} & set(secret)


def test_keyword_search_ranks_words_with_stemming_and_stopwords(store: Store) -> None:
    scope = _scope(store, "chat")
    ids = _add(
        store,
        scope,
        [
            "She runs every morning along the river",
            "The river flooded the old mill",
            "They talked about the weather",
            "Café au lait in Paris",
        ],
    )
    hits = store.read_sync(vectors.keyword_search, scope, "What about running by the river?", 10)
    assert [h.memory_id for h in hits][:1] == [ids[0]]  # 'running' ~ 'runs', and 'river'
    assert {h.memory_id for h in hits} == {ids[0], ids[1]}  # 'about' is a stopword
    assert hits == sorted(hits, key=lambda h: -h.score)
    assert store.read_sync(vectors.keyword_search, scope, "cafe", 5)[0].memory_id == ids[3]
    assert store.read_sync(vectors.keyword_search, scope, "the", 5) != []  # only stopwords


def test_query_words_are_plain_words_only() -> None:
    assert vectors.query_words('cat* NEAR("dog") AND bird:') == ["cat", "near", "dog", "bird"]
    assert vectors.query_words("the of and") == ["the", "of", "and"]  # only stopwords: kept
    assert vectors.query_words("?!* 🙂") == []
    long = vectors.query_words(" ".join(f"w{i}" * (1 + i % 7) for i in range(200)))
    assert len(long) == vectors.MAX_TERMS
    assert vectors.match_expression(["cat", "dog"]) == '"cat" OR "dog"'
    assert vectors.match_expression([]) is None


def test_keyword_search_prefers_rare_words_in_big_stores(store: Store) -> None:
    scope = _scope(store, "chat")
    common = [f"Alice said something about the weather {i}" for i in range(3000)]
    ids = _add(store, scope, [*common, "Alice mentioned the zeppelin museum"])
    hits = store.read_sync(vectors.keyword_search, scope, "Alice and the zeppelin", 3)
    assert hits[0].memory_id == ids[-1]
    # 'alice' is in every memory: beyond the postings budget, it is left out.
    assert len(hits) == 1


# -- deleting a scope --------------------------------------------------------------


def test_delete_scope_removes_its_vectors_and_fts_rows(store: Store) -> None:
    keep, gone = _scope(store, "keep"), _scope(store, "gone")
    _add(store, keep, ["shared words here"])
    _add(store, gone, [f"shared words {i}" for i in range(50)])
    assert store.read_sync(_pack_entries) == 51
    store.write_sync(records.delete_scope, gone)
    assert store.read_sync(_pack_entries) == 1
    assert (
        store.read_sync(lambda c: c.execute("SELECT count(*) FROM embeddings").fetchone()[0]) == 1
    )
    fts = store.read_sync(
        lambda c: c.execute(
            "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'shared'"
        ).fetchone()[0]
    )
    assert fts == 1
    assert len(store.read_sync(vectors.keyword_search, keep, "shared words", 10)) == 1


def test_searches_see_every_change_to_the_scope(store: Store) -> None:
    # Readers cache a scope's packed bits; each change must still show at once.
    scope = _scope(store, "chat")
    query = fake_vec("q")
    first = _add(store, scope, [f"far {i}" for i in range(700)])  # more than one pack
    before = store.read_sync(vectors.knn, scope, query, 3)
    (closest,) = _add(store, scope, ["closest"], [near(query, 0.1, "c")])
    assert store.read_sync(vectors.knn, scope, query, 1)[0].memory_id == closest
    store.write_sync(records.retract_memories, scope, [closest])
    assert store.read_sync(vectors.knn, scope, query, 3) == before
    store.write_sync(records.delete_memory, scope, before[0].memory_id)
    after = store.read_sync(vectors.knn, scope, query, 3)
    assert [h.memory_id for h in after] == [h.memory_id for h in before[1:]] + [after[2].memory_id]
    assert after[2].memory_id in first
    store.write_sync(vectors.compact_vectors)
    assert store.read_sync(vectors.knn, scope, query, 3) == after


def test_a_new_word_is_found_at_once(store: Store) -> None:
    scope = _scope(store, "chat")
    _add(store, scope, ["we talked about dogs"])
    assert store.read_sync(vectors.keyword_search, scope, "Biscuit the dog", 5) != []
    assert store.read_sync(vectors.keyword_search, scope, "Biscuit", 5) == []
    (named,) = _add(store, scope, ["her dog is called Biscuit"])
    for _ in range(3):  # whichever reader thread answers
        assert store.read_sync(vectors.keyword_search, scope, "Biscuit", 5)[0].memory_id == named


def test_readers_of_one_database_share_the_vector_cache(tmp_path: Path) -> None:
    with Store.open_sync(tmp_path / "memory.db") as store:
        scope = _scope(store, "chat")
        _add(store, scope, [f"turn {i}" for i in range(10)])
    first = open_connection(tmp_path / "memory.db", readonly=True)
    second = open_connection(tmp_path / "memory.db", readonly=True)
    writer = open_connection(tmp_path / "memory.db")
    other = open_connection(tmp_path / "other.db")
    try:
        hits = vectors.knn(first, scope, fake_vec("turn 3"), 3)
        cache = vectors._cache_of(first)
        assert scope in cache and vectors._cache_of(second) is cache
        assert vectors.knn(second, scope, fake_vec("turn 3"), 3) == hits
        # A writer may see what it has not committed yet: it keeps a cache of its own.
        assert vectors._cache_of(writer) is not cache
        assert vectors._cache_of(other) is not cache
    finally:
        for conn in (first, second, writer, other):
            conn.close()


def _cached(conn: Connection, scope_id: int) -> tuple[object, object]:
    """The readers' cache entry of a scope (its pack signature and positions), and the
    scope's packs as they are now."""
    entry = vectors._cache_of(conn).get(scope_id)
    packs = tuple((p[0], p[1]) for p in vectors._packs(conn, scope_id))
    return (entry.signature, entry._positions is not None) if entry else None, packs


def test_warming_caches_a_scopes_current_vectors_for_the_next_search(store: Store) -> None:
    # After a write, the next search would rebuild the scope's entry while a user waits.
    scope = _scope(store, "chat")
    _add(store, scope, [f"turn {i}" for i in range(10)])
    store.read_sync(vectors.knn, scope, fake_vec("turn 3"), 3)
    _add(store, scope, ["one more turn"])
    entry, packs = store.read_sync(_cached, scope)
    assert entry is not None and entry[0] != packs  # stale: the packs changed
    store.read_sync(vectors.warm, [scope])
    for _ in range(3):  # whichever reader thread answers
        entry, packs = store.read_sync(_cached, scope)
        assert entry == (packs, True)
    store.read_sync(vectors.warm, [scope + 1])  # a scope without vectors: nothing to do


def test_cached_vectors_stay_true_across_writes_in_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch, tolerance: float
) -> None:
    monkeypatch.setattr(vectors, "CHUNK_PACKS", 2)  # 2 packs of 512 entries a chunk
    scope = _scope(store, "chat")
    query = fake_vec("q")
    texts = [f"turn {i}" for i in range(2100)]
    vecs = [near(query, 0.5 + i / 1000, t) for i, t in enumerate(texts)]
    ids = _add(store, scope, texts, vecs)
    store.read_sync(vectors.knn, scope, query, 5)
    # Appending fills the last pack; retracting and compacting rewrites the first one.
    more = _add(store, scope, ["one more turn"], [query])
    store.write_sync(records.retract_memories, scope, ids[:5])
    store.write_sync(vectors.compact_vectors)
    hits = store.read_sync(vectors.knn, scope, query, 20)
    assert hits[0].memory_id == more[0]
    exact = {m: float(v @ query) for m, v in zip(ids, vecs, strict=True)}
    for hit in hits[1:]:  # each similarity true to its memory, the retracted ones gone
        assert hit.memory_id in ids[5:]
        assert hit.similarity == pytest.approx(exact[hit.memory_id], abs=tolerance)
    wanted = [ids[0], ids[700], ids[1500], ids[2099], more[0]]
    sims = store.read_sync(vectors.similarities, scope, wanted, query)
    expected = [exact[m] for m in wanted[:-1]] + [1.0]
    assert [sims[m] for m in wanted] == pytest.approx(expected, abs=tolerance)
