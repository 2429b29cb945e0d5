"""The readers' cache of recall's rows: whatever changes a memory (an edit, a pin, a
retraction, a deletion, a lost source) is what the next search sees, and a reader on
an older snapshot never sees a newer row nor leaves an older one behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.memory import records
from proxy.memory.db import Connection, open_connection
from proxy.memory.recall_rows import Row, load_rows
from proxy.memory.record import store_messages
from proxy.memory.store import Store

T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open_sync(tmp_path / "memory.db") as s:
        yield s


def chat(store: Store, texts: list[str]) -> tuple[int, list[int], list[int]]:
    """A scope with one user turn per text: (scope id, message ids, memory ids)."""

    def write(conn: Connection) -> tuple[int, list[int], list[int]]:
        scope_id = records.get_or_create_scope(conn, "", "chat", None, T0).id
        rows = [
            records.NewMessage(role="user", content=t, fingerprint=str(i), seen_at=T0 + i)
            for i, t in enumerate(texts)
        ]
        thread = records.new_thread(conn, scope_id)
        message_ids, memory_ids = store_messages(
            conn, scope_id, rows, thread=thread, request_id=None, now=T0
        )
        return scope_id, message_ids, memory_ids

    return store.write_sync(write)


def rows(store: Store, scope_id: int, ids: list[int]) -> dict[int, Row]:
    return store.read_sync(load_rows, scope_id, ids)


def change(store: Store, fn: Callable[[Connection], Any]) -> None:
    store.write_sync(fn)


def test_each_kind_of_change_reaches_the_next_search(store: Store) -> None:
    scope, messages, (a, b, c, d) = chat(store, ["alpha", "beta", "gamma", "delta"])
    before = rows(store, scope, [a, b, c, d])  # all four cached now
    assert before[a].text == "alpha" and not before[b].pinned and before[d].sources

    change(store, lambda conn: records.update_memory_text(conn, scope, a, "alpha, edited"))
    change(store, lambda conn: records.set_pinned(conn, scope, b, True))
    change(store, lambda conn: records.retract_memories(conn, scope, [c]))
    change(store, lambda conn: conn.execute("DELETE FROM messages WHERE id = ?", (messages[3],)))
    after = rows(store, scope, [a, b, c, d])
    assert after[a].text == "alpha, edited"
    assert after[b].pinned
    assert c not in after  # retracted: no longer a candidate
    assert after[d].sources == ()  # its message is gone

    change(store, lambda conn: records.delete_memory(conn, scope, a))
    assert a not in rows(store, scope, [a, b])
    change(
        store,
        lambda conn: conn.execute("UPDATE memories SET importance = 0.9 WHERE id = ?", (b,)),
    )
    assert rows(store, scope, [b])[b].importance == 0.9


def test_rows_of_another_scope_are_never_served(store: Store) -> None:
    scope, _, (a,) = chat(store, ["alpha"])
    assert a in rows(store, scope, [a])
    other = store.write_sync(
        lambda conn: records.get_or_create_scope(conn, "", "other", None, T0).id
    )
    assert rows(store, other, [a]) == {}


def test_an_older_snapshot_reads_its_own_rows_and_leaves_the_cache_right(
    store: Store, tmp_path: Path
) -> None:
    scope, _, (a,) = chat(store, ["alpha"])
    change(store, lambda conn: records.set_pinned(conn, scope, a, False))  # a logged change
    rows(store, scope, [a])
    old = open_connection(tmp_path / "memory.db", readonly=True)  # shares the readers' cache
    try:
        old.execute("BEGIN")
        assert load_rows(old, scope, [a])[a].text == "alpha"  # the snapshot starts here
        change(store, lambda conn: records.update_memory_text(conn, scope, a, "alpha, edited"))
        assert rows(store, scope, [a])[a].text == "alpha, edited"
        assert load_rows(old, scope, [a])[a].text == "alpha"  # still its snapshot's row
        old.execute("COMMIT")
    finally:
        old.close()
    assert rows(store, scope, [a])[a].text == "alpha, edited"


def test_a_cache_behind_the_pruned_log_starts_over(store: Store) -> None:
    scope, _, (a, b) = chat(store, ["alpha", "beta"])
    rows(store, scope, [a, b])

    def many_changes(conn: Connection) -> None:
        records.update_memory_text(conn, scope, a, "alpha, edited")  # logged first
        for i in range(10_000):  # then past the log's ~8k kept entries
            conn.execute("UPDATE memories SET importance = ? WHERE id = ?", (i / 10_000, b))

    change(store, many_changes)
    logged = store.read_sync(
        lambda conn: [r[0] for r in conn.execute("SELECT memory_id FROM memory_changes")]
    )
    assert a not in logged  # the edit of `a` is no longer in the log
    after = rows(store, scope, [a, b])
    assert after[a].text == "alpha, edited"
    assert after[b].importance == pytest.approx(0.9999)
