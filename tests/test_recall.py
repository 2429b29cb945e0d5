"""Recall's search on a real store: exact similarities for every candidate, the turns
next to a candidate, and the span of time a query names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from proxy.memory import records, vectors
from proxy.memory.db import Connection
from proxy.memory.rank import Weights
from proxy.memory.recall import RecallQuery, find_candidates, look_up, recall
from proxy.memory.record import store_messages
from proxy.memory.store import Store
from proxy.memory.timeq import TimeSpan

DIM = 384
DAY = 86_400.0
T0 = 1_700_000_000.0


def fake_vec(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, amount: float, salt: str) -> np.ndarray:
    w = v + amount * fake_vec(salt)
    return w / np.linalg.norm(w)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open_sync(tmp_path / "memory.db") as s:
        yield s


def chat(
    store: Store, turns: list[tuple[str, str, float]], vecs: dict[str, np.ndarray]
) -> tuple[int, dict[str, int]]:
    """A scope holding one chat of (role, text, date) turns; each text's vector is
    ``vecs[text]`` or unrelated to everything. Returns the scope id and memory ids."""

    def write(conn: Connection) -> tuple[int, dict[str, int]]:
        scope_id = records.get_or_create_scope(conn, "", "chat", None, T0).id
        rows = [
            records.NewMessage(role=r, content=t, fingerprint=f"{i}", seen_at=at)
            for i, (r, t, at) in enumerate(turns)
        ]
        thread = records.new_thread(conn, scope_id)
        _, memory_ids = store_messages(conn, scope_id, rows, thread=thread, request_id=None, now=T0)
        ids = {t: m for (_, t, _), m in zip(turns, memory_ids, strict=True)}
        vectors.store_vectors(conn, "fake", [(ids[t], vecs.get(t, fake_vec(t))) for t in ids])
        return scope_id, ids

    return store.write_sync(write)


def test_a_keyword_only_candidate_gets_its_exact_similarity(store: Store) -> None:
    query = fake_vec("query")
    filler = [("user", f"filler turn number {i}", T0 + i) for i in range(40)]
    keyword = "the zeppelin landed in Lisbon"
    vecs = {keyword: near(query, 1.5, "kw")}
    scope, ids = chat(store, [*filler, ("user", keyword, T0 + 100)], vecs)
    found = store.read_sync(find_candidates, scope, query, "zeppelin", 1)
    by_id = {c.memory_id: c for c in found}
    assert ids[keyword] in by_id
    c = by_id[ids[keyword]]
    assert c.bm25_rank == 0
    assert c.vector_sim == pytest.approx(float(vecs[keyword] @ query), abs=1e-5)


def test_context_brings_the_turns_around_a_candidate_and_their_best_similarity(
    store: Store,
) -> None:
    query = fake_vec("query")
    turns = [
        ("user", "unrelated opening", T0),
        ("user", "I adopted a cat last spring", T0 + 1),  # weak alone
        ("assistant", "Cats make wonderful companions", T0 + 2),  # the strong match
        ("user", "unrelated closing", T0 + 3),
    ]
    vecs = {"Cats make wonderful companions": near(query, 0.2, "a")}
    scope, ids = chat(store, turns, vecs)
    plain = store.read_sync(find_candidates, scope, query, "", 1)
    assert [c.memory_id for c in plain] == [ids["Cats make wonderful companions"]]
    assert plain[0].context_sim is None
    found = {
        c.memory_id: c for c in store.read_sync(find_candidates, scope, query, "", 1, context=True)
    }
    # The reply's neighbours joined, each credited with the reply's similarity.
    strong = float(vecs["Cats make wonderful companions"] @ query)
    for text in ("I adopted a cat last spring", "unrelated closing"):
        assert found[ids[text]].context_sim == pytest.approx(strong, abs=1e-5)
        assert found[ids[text]].vector_sim is not None
    assert ids["unrelated opening"] not in found


def test_context_joins_the_other_pieces_of_a_long_message(store: Store) -> None:
    long = " ".join(f"Sentence {i} tells of the harbour and its ships." for i in range(40))
    query = fake_vec("query")

    def write(conn: Connection) -> tuple[int, list[int]]:
        scope_id = records.get_or_create_scope(conn, "", "chat", None, T0).id
        row = records.NewMessage(role="assistant", content=long, fingerprint="x", seen_at=T0)
        _, memory_ids = store_messages(conn, scope_id, [row], thread=1, request_id=None, now=T0)
        pairs = [(m, near(query, 0.1, "first") if i == 0 else fake_vec(f"p{i}"))
                 for i, m in enumerate(memory_ids)]  # fmt: skip
        vectors.store_vectors(conn, "fake", pairs)
        return scope_id, memory_ids

    scope, pieces = store.write_sync(write)
    assert len(pieces) > 2
    found = {
        c.memory_id for c in store.read_sync(find_candidates, scope, query, "", 1, context=True)
    }
    assert found == set(pieces)


def test_a_span_brings_in_its_memories_and_ranks_them_first(store: Store) -> None:
    query = fake_vec("query")
    # A talk every third day, the earlier ones closer to the query.
    turns = [("user", f"talk number {d}", T0 + 3 * d * DAY) for d in range(30)]
    vecs = {f"talk number {d}": near(query, 0.5 + 0.02 * d, f"d{d}") for d in range(30)}
    scope, ids = chat(store, turns, vecs)
    target = ids["talk number 10"]
    span = TimeSpan(T0 + 30 * DAY, T0 + 31 * DAY, "that day")
    plain = {c.memory_id for c in store.read_sync(find_candidates, scope, query, "", 3)}
    assert target not in plain
    with_span = store.read_sync(find_candidates, scope, query, "", 3, span=span)
    assert target in {c.memory_id for c in with_span}
    # recall() reads the span from the query's words, relative to its now.
    now = T0 + 33 * DAY
    q = RecallQuery("what did I say three days ago?", query, now, Weights(time=1.0), 3, 3)
    recalled = store.read_sync(recall, scope, q)
    assert recalled[0].memory_id == target
    assert recalled[0].components["time"] == 1.0
    off = RecallQuery(q.text, query, now, Weights(time=0.0), 3, 3)
    assert target not in {m.memory_id for m in store.read_sync(recall, scope, off)}


def test_recall_gives_the_same_answer_with_its_lookup_done_while_the_query_embeds(
    store: Store,
) -> None:
    query = fake_vec("query")
    turns = [("user", f"we talked about topic {i}", T0 + i * DAY) for i in range(60)]
    turns += [("user", "the zeppelin landed in Lisbon", T0 + 61 * DAY)]
    vecs = {f"we talked about topic {i}": near(query, 0.3 + 0.05 * i, f"t{i}") for i in range(60)}
    scope, ids = chat(store, turns, vecs)
    now = T0 + 62 * DAY
    q = RecallQuery("what about the zeppelin, three days ago?", query, now, Weights(), 10, 8)
    alone = store.read_sync(recall, scope, q)
    lookup = store.read_sync(look_up, scope, q.text, q.candidates, now=now, context=True)
    assert list(lookup.ranks) == [ids["the zeppelin landed in Lisbon"]]
    assert lookup.span is not None and ids["we talked about topic 59"] in lookup.span_ids
    assert store.read_sync(recall, scope, q, lookup) == alone
