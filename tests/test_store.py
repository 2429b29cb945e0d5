"""The Store (writer thread, reader pool) and the SQL operations on scopes, the
transcript, memories, summaries, style, jobs and the request log."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.memory import jobs, records, scope_state
from proxy.memory.db import Connection, StoreClosed
from proxy.memory.records import NewMemory, NewMessage
from proxy.memory.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open_sync(tmp_path / "memory.db", readers=2) as s:
        yield s


def _messages(store: Store, scope_id: int, texts: list[str], start: float = 0.0) -> list[int]:
    rows = [
        NewMessage(
            "user" if i % 2 == 0 else "assistant", text, f"fp:{text}", start + i, {"content": text}
        )
        for i, text in enumerate(texts)
    ]
    return store.write_sync(records.append_messages, scope_id, rows, "req-1")


def _count(conn: Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# -- the Store ---------------------------------------------------------------------


def test_failed_write_is_rolled_back_entirely(store: Store) -> None:
    def half_then_fail(conn: Connection) -> None:
        scope = records.get_or_create_scope(conn, "", "chat", None, 1.0)
        records.append_messages(conn, scope.id, [NewMessage("user", "hi", "fp", 1.0)], None)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.write_sync(half_then_fail)
    assert store.read_sync(_count, "scopes") == 0
    assert store.read_sync(_count, "messages") == 0
    # The writer is still healthy afterwards.
    store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    assert store.read_sync(_count, "scopes") == 1


def test_async_writes_run_in_order_and_are_readable(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        async with Store(tmp_path / "m.db") as store:
            scope = await store.write(records.get_or_create_scope, "", "chat", None, 1.0)
            await asyncio.gather(
                *(
                    store.write(
                        records.append_messages,
                        scope.id,
                        [NewMessage("user", f"m{i}", f"fp{i}", float(i))],
                        None,
                    )
                    for i in range(50)
                )
            )
            rows = await store.read(records.get_messages, scope.id)
            return [m.content for m in rows]

    assert asyncio.run(scenario()) == [f"m{i}" for i in range(50)]


def test_reads_run_while_writes_are_going_on(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        async with Store(tmp_path / "m.db", readers=2) as store:
            scope = await store.write(records.get_or_create_scope, "", "chat", None, 1.0)

            async def writer() -> None:
                for i in range(40):
                    rows = [NewMessage("user", f"m{i}-{j}", f"fp{i}-{j}", 1.0) for j in range(50)]
                    await store.write(records.append_messages, scope.id, rows, None)

            seen: list[int] = []

            async def reader() -> None:
                while len(seen) < 200:
                    seen.append(await store.read(_count, "messages"))

            await asyncio.gather(writer(), reader(), reader())
            seen.append(await store.read(_count, "messages"))
            return seen

    seen = asyncio.run(scenario())
    assert seen[-1] == 2000
    # Every read saw a committed state: whole batches of 50, never half of one.
    assert all(n % 50 == 0 for n in seen)


def test_a_big_write_never_blocks_the_event_loop(tmp_path: Path) -> None:
    def big_batch(conn: Connection, scope_id: int) -> None:
        for start in range(0, 6000, 1000):
            rows = [
                NewMemory(scope_id, "turn", f"memory number {i} about the sea", float(i))
                for i in range(start, start + 1000)
            ]
            records.insert_memories(conn, rows, 1.0)

    async def scenario() -> tuple[float, float, int]:
        async with Store(tmp_path / "m.db") as store:
            scope = await store.write(records.get_or_create_scope, "", "chat", None, 1.0)
            ticks: list[float] = []
            stop = asyncio.Event()

            async def tick() -> None:
                while not stop.is_set():
                    ticks.append(time.perf_counter())
                    await asyncio.sleep(0.005)

            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.02)
            start = time.perf_counter()
            await store.write(big_batch, scope.id)
            elapsed = time.perf_counter() - start
            stop.set()
            await ticker
            during = [t for t in ticks if t >= start]
            gaps = [b - a for a, b in itertools.pairwise(ticks)]
            return elapsed, max(gaps), len(during)

    elapsed, worst_gap, ticks_during = asyncio.run(scenario())
    print(f"write {elapsed:.3f}s, worst loop gap {worst_gap:.3f}s, {ticks_during} ticks")
    assert elapsed > 0.1  # the batch was big enough to matter
    assert ticks_during >= 5
    # A blocked loop would show one gap as long as the whole write; a busy shared
    # machine may still delay a tick now and then.
    assert worst_gap < max(0.1, elapsed / 4), f"the event loop stalled for {worst_gap:.3f}s"


def test_a_cancelled_caller_does_not_cancel_its_write(tmp_path: Path) -> None:
    path = tmp_path / "m.db"

    def slow_write(conn: Connection) -> None:
        time.sleep(0.2)
        records.get_or_create_scope(conn, "", "kept", None, 1.0)

    async def scenario() -> None:
        store = Store(path)
        await store.start()
        task = asyncio.create_task(store.write(slow_write))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.close()  # drains the queued write

    asyncio.run(scenario())
    with Store.open_sync(path) as store:
        assert store.read_sync(records.get_scope, "", "kept") is not None


def test_close_drains_queued_writes_then_refuses_more(tmp_path: Path) -> None:
    path = tmp_path / "m.db"

    async def scenario() -> Store:
        store = Store(path)
        await store.start()
        queued = [  # submitted, not awaited before close
            asyncio.ensure_future(store.write(records.get_or_create_scope, "", f"s{i}", None, 1.0))
            for i in range(20)
        ]
        await asyncio.sleep(0)
        await store.close()
        await asyncio.gather(*queued)
        return store

    store = asyncio.run(scenario())
    with pytest.raises(StoreClosed):
        store.write_sync(records.get_or_create_scope, "", "late", None, 1.0)
    with Store.open_sync(path) as again:
        assert len(again.read_sync(records.list_scopes, None)) == 20


def test_reads_cannot_write(store: Store) -> None:
    with pytest.raises(Exception, match="readonly"):
        store.read_sync(records.get_or_create_scope, "", "chat", None, 1.0)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from proxy.memory import records
    from proxy.memory.store import Store
    store = Store.open_sync(sys.argv[1])
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    rows = [records.NewMessage("user", "remember me", "fp", 1.0)]
    store.write_sync(records.append_messages, scope.id, rows, None)
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_process_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.stdout.strip() == "committed"
    assert done.returncode == -signal.SIGKILL
    assert os.path.exists(f"{path}-wal")  # the commit lives in the WAL only
    with Store.open_sync(path) as store:
        scope = store.read_sync(records.get_scope, "", "chat")
        assert scope is not None
        assert [m.content for m in store.read_sync(records.get_messages, scope.id)] == [
            "remember me"
        ]


# -- scopes ------------------------------------------------------------------------


def test_scopes_belong_to_their_owner(store: Store) -> None:
    a = store.write_sync(records.get_or_create_scope, "key-a", "chat", "Alice", 1.0)
    assert store.read_sync(records.get_scope, "key-b", "chat") is None
    assert store.read_sync(records.get_scope_by_id, "key-b", a.id) is None
    assert store.read_sync(records.get_scope_by_id, None, a.id) == a  # admin
    b = store.write_sync(records.get_or_create_scope, "key-b", "chat", None, 2.0)
    assert b.id != a.id
    assert [s.scope.id for s in store.read_sync(records.list_scopes, "key-a")] == [a.id]
    assert len(store.read_sync(records.list_scopes, None)) == 2


def test_get_or_create_scope_is_stable_and_touches(store: Store) -> None:
    first = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    again = store.write_sync(records.get_or_create_scope, "", "chat", "Alice", 5.0)
    assert again.id == first.id
    assert again.label == "Alice"  # filled in once known
    assert again.last_seen == 5.0 and again.created_at == 1.0
    kept = store.write_sync(records.get_or_create_scope, "", "chat", "Other", 6.0)
    assert kept.label == "Alice"


def test_scope_settings_rename_and_counts(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    other = store.write_sync(records.get_or_create_scope, "", "taken", None, 1.0)
    settings = store.write_sync(records.update_scope_settings, scope.id, {"depth": 2, "x": 1})
    assert settings == {"depth": 2, "x": 1}
    assert store.write_sync(records.update_scope_settings, scope.id, {"x": None}) == {"depth": 2}
    with pytest.raises(records.ScopeNameTaken):
        store.write_sync(records.rename_scope, scope.id, name=other.name)
    assert store.write_sync(records.rename_scope, scope.id, name="renamed", label="Bob")
    renamed = store.read_sync(records.get_scope, "", "renamed")
    assert renamed is not None and renamed.label == "Bob" and renamed.settings == {"depth": 2}
    ids = _messages(store, scope.id, ["a", "b", "c"])
    store.write_sync(records.insert_memories, [NewMemory(scope.id, "turn", "a b", 1.0)], 1.0)
    store.write_sync(records.undo_messages, scope.id, ids[2:], 2.0)
    listing = {s.scope.id: s for s in store.read_sync(records.list_scopes, "")}
    assert (listing[scope.id].messages, listing[scope.id].memories) == (2, 1)
    assert (listing[other.id].messages, listing[other.id].memories) == (0, 0)


# -- transcript and undo -----------------------------------------------------------


def test_append_assigns_increasing_seq_and_transcript_is_in_order(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    first = _messages(store, scope.id, ["hello", "hi"])
    second = _messages(store, scope.id, ["how are you", "fine"])
    transcript = store.read_sync(records.active_transcript, scope.id)
    assert [t.id for t in transcript] == first + second
    assert [t.fingerprint for t in transcript] == ["fp:hello", "fp:hi", "fp:how are you", "fp:fine"]
    messages = store.read_sync(records.get_messages, scope.id)
    assert [m.seq for m in messages] == [1, 2, 3, 4]
    assert messages[0].raw == {"content": "hello"} and messages[0].request_id == "req-1"
    found = store.read_sync(records.messages_by_fingerprint, scope.id, ["fp:hi", "fp:nope"])
    assert found == {"fp:hi": [first[1]]}


def test_undo_retracts_exactly_the_memories_whose_sources_are_all_undone(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    m1, m2, m3, m4 = _messages(store, scope.id, ["u1", "a1", "u2", "a2"])
    both, only_a2, only_u2, mixed, note = store.write_sync(
        records.insert_memories,
        [
            NewMemory(scope.id, "turn", "u2 + a2", 1.0, sources=[m3, m4]),
            NewMemory(scope.id, "turn", "a2", 1.0, sources=[m4]),
            NewMemory(scope.id, "fact", "u2", 1.0, sources=[m3]),
            NewMemory(scope.id, "fact", "a1 + a2", 1.0, sources=[m2, m4]),
            NewMemory(scope.id, "note", "a note", 1.0, pinned=True),
        ],
        2.0,
    )
    # A regenerate: the last reply is undone.
    assert store.write_sync(records.undo_messages, scope.id, [m4], 3.0) == [only_a2]
    # Delete-below: the user's message goes too; 'both' now has no live source.
    assert store.write_sync(records.undo_messages, scope.id, [m3, m4], 4.0) == sorted(
        [both, only_u2]
    )
    active = {m.id for m in store.read_sync(records.list_memories, scope.id)}
    assert active == {mixed, note}
    retracted = store.read_sync(records.list_memories, scope.id, states=["retracted"])
    assert {m.id for m in retracted} == {both, only_a2, only_u2}  # kept, inactive
    assert [t.id for t in store.read_sync(records.active_transcript, scope.id)] == [m1, m2]
    undone = store.read_sync(records.get_messages, scope.id, include_undone=True)
    assert [(m.state, m.undone_at) for m in undone[2:]] == [("undone", 4.0), ("undone", 3.0)]


def test_undo_is_confined_to_its_scope(store: Store) -> None:
    a = store.write_sync(records.get_or_create_scope, "", "a", None, 1.0)
    b = store.write_sync(records.get_or_create_scope, "", "b", None, 1.0)
    (msg,) = _messages(store, a.id, ["hello"])
    store.write_sync(
        records.insert_memories, [NewMemory(a.id, "turn", "hi", 1.0, sources=[msg])], 1.0
    )
    assert store.write_sync(records.undo_messages, b.id, [msg], 2.0) == []
    assert [t.id for t in store.read_sync(records.active_transcript, a.id)] == [msg]


def test_memory_sources_must_be_in_the_same_scope(store: Store) -> None:
    a = store.write_sync(records.get_or_create_scope, "", "a", None, 1.0)
    b = store.write_sync(records.get_or_create_scope, "", "b", None, 1.0)
    (msg,) = _messages(store, a.id, ["hello"])
    with pytest.raises(ValueError, match="not all messages"):
        store.write_sync(
            records.insert_memories, [NewMemory(b.id, "turn", "x", 1.0, sources=[msg])], 1.0
        )
    assert store.read_sync(_count, "memories") == 0


# -- memories ----------------------------------------------------------------------


def test_memory_operations_stay_inside_the_scope(store: Store) -> None:
    a = store.write_sync(records.get_or_create_scope, "", "a", None, 1.0)
    b = store.write_sync(records.get_or_create_scope, "", "b", None, 1.0)
    (mem,) = store.write_sync(records.insert_memories, [NewMemory(a.id, "fact", "x", 1.0)], 1.0)
    assert not store.write_sync(records.set_pinned, b.id, mem, True)
    assert not store.write_sync(records.update_memory_text, b.id, mem, "hijacked")
    assert not store.write_sync(records.delete_memory, b.id, mem)
    assert store.write_sync(records.retract_memories, b.id, [mem]) == []
    assert store.read_sync(records.load_candidates, b.id, [mem]) == []
    assert store.read_sync(records.get_memory, a.id, mem).text == "x"


def test_memory_lifecycle(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    msgs = _messages(store, scope.id, ["I adopted a cat", "Lovely!"])
    old, new, note = store.write_sync(
        records.insert_memories,
        [
            NewMemory(scope.id, "fact", "has a cat", 1.0, sources=msgs, meta={"c": 1}),
            NewMemory(scope.id, "fact", "has two cats", 2.0, importance=0.9),
            NewMemory(scope.id, "note", "call her Mags", 3.0, speaker="Mags"),
        ],
        5.0,
    )
    assert [m.id for m in store.read_sync(records.memories_to_embed, 10)] == [old, new, note]
    assert store.write_sync(records.supersede_memory, scope.id, old, new)
    assert store.write_sync(records.set_pinned, scope.id, note, True)
    pinned = store.read_sync(records.list_memories, scope.id, kinds=["note"], pinned=True)
    assert [m.id for m in pinned] == [note]
    loaded = store.read_sync(records.load_candidates, scope.id, [note, old, new])
    assert [m.id for m in loaded] == [note, new]  # the superseded one is gone, order kept
    got = store.read_sync(records.get_memory, scope.id, old)
    assert got.state == "superseded" and got.superseded_by == new
    assert got.sources == tuple(msgs) and got.meta == {"c": 1} and got.created_at == 5.0
    assert store.write_sync(records.delete_memory, scope.id, new)
    assert store.read_sync(records.get_memory, scope.id, old).superseded_by is None
    page = store.read_sync(records.list_memories, scope.id, states=["active", "superseded"])
    assert [m.id for m in page] == [note, old]
    assert [
        m.id
        for m in store.read_sync(
            records.list_memories, scope.id, states=["active", "superseded"], before_id=note
        )
    ] == [old]


# -- summaries and style -----------------------------------------------------------


def test_summary_history(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    first = store.write_sync(scope_state.save_summary, scope.id, "v1", 10, 1.0)
    second = store.write_sync(scope_state.save_summary, scope.id, "v2", 20, 2.0, {"m": "x"})
    current = store.read_sync(scope_state.current_summary, scope.id)
    assert current.id == second and current.covers_until_seq == 20 and current.meta == {"m": "x"}
    history = store.read_sync(scope_state.list_summaries, scope.id)
    assert [(s.id, s.state) for s in history] == [(second, "active"), (first, "archived")]
    assert store.write_sync(scope_state.retract_summary, scope.id, second)
    assert store.read_sync(scope_state.current_summary, scope.id).id == first


def test_auto_style_never_replaces_a_manual_one(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    (msg,) = _messages(store, scope.id, ["*waves* Hello, traveller."])
    assert store.write_sync(scope_state.set_style, scope.id, "auto one", "auto", 1.0, msg)
    assert store.write_sync(scope_state.set_style, scope.id, "mine", "manual", 2.0)
    assert not store.write_sync(scope_state.set_style, scope.id, "auto two", "auto", 3.0)
    assert store.write_sync(scope_state.set_style_enabled, scope.id, False)
    style = store.read_sync(scope_state.get_style, scope.id)
    assert (style.text, style.source, style.enabled, style.message_id) == (
        "mine",
        "manual",
        False,
        None,
    )


# -- jobs --------------------------------------------------------------------------


def test_jobs_claim_finish_fail_and_backoff(store: Store) -> None:
    scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    embed = store.write_sync(jobs.enqueue, "embed", {"ids": [1]}, scope.id, 10.0)
    later = store.write_sync(jobs.enqueue, "summarize", {}, scope.id, 10.0, run_after=50.0)
    other = store.write_sync(jobs.enqueue, "extract", {}, None, 11.0)
    claimed = store.write_sync(jobs.claim, ["embed", "summarize"], 20.0, 10)
    assert [(j.id, j.state, j.attempts, j.payload) for j in claimed] == [
        (embed, "running", 1, {"ids": [1]})
    ]
    assert store.write_sync(jobs.claim, ["embed"], 20.0, 10) == []  # not claimed twice
    assert store.read_sync(jobs.queue_depth) == {
        "embed": {"pending": 0, "running": 1},
        "summarize": {"pending": 1, "running": 0},
        "extract": {"pending": 1, "running": 0},
    }
    # Fails, retried later with backoff.
    assert store.write_sync(jobs.fail, embed, "model busy", 21.0, retry_at=30.0)
    # Not due yet at 25: only the extract job is handed out.
    assert [j.id for j in store.write_sync(jobs.claim, None, 25.0, 10)] == [other]
    retried = store.write_sync(jobs.claim, ["embed"], 30.0, 10)
    assert [(j.id, j.attempts, j.last_error) for j in retried] == [(embed, 2, "model busy")]
    assert store.write_sync(jobs.finish, embed, 31.0)
    # Gives up for good.
    (summ,) = store.write_sync(jobs.claim, ["summarize"], 50.0, 10)
    assert summ.id == later
    assert store.write_sync(jobs.fail, later, "bad output", 51.0, None)
    states = {j.id: (j.state, j.last_error) for j in store.read_sync(jobs.list_jobs)}
    assert states[embed] == ("done", "model busy")
    assert states[later] == ("failed", "bad output")
    assert states[other][0] == "running"
    assert store.write_sync(jobs.prune_jobs, 100.0) == 2
    assert [j.id for j in store.read_sync(jobs.list_jobs)] == [other]


def test_claim_respects_run_after_and_order(store: Store) -> None:
    a = store.write_sync(jobs.enqueue, "embed", {}, None, 1.0, run_after=5.0)
    b = store.write_sync(jobs.enqueue, "embed", {}, None, 2.0, run_after=3.0)
    store.write_sync(jobs.enqueue, "embed", {}, None, 2.0, run_after=100.0)
    assert store.write_sync(jobs.claim, ["embed"], 2.0, 10) == []
    assert [j.id for j in store.write_sync(jobs.claim, ["embed"], 10.0, 10)] == [b, a]


def test_requeue_running_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with Store.open_sync(path) as store:
        job = store.write_sync(jobs.enqueue, "embed", {"x": 1}, None, 1.0)
        store.write_sync(jobs.claim, ["embed"], 2.0, 1)
    # The process died with the job running: at the next start it is pending again.
    with Store.open_sync(path) as store:
        assert store.write_sync(jobs.requeue_running, 3.0) == 1
        (again,) = store.write_sync(jobs.claim, ["embed"], 4.0, 1)
        assert (again.id, again.attempts, again.payload) == (job, 2, {"x": 1})


# -- request log -------------------------------------------------------------------


def test_request_log_owner_isolation_and_pruning(store: Store) -> None:
    a = store.write_sync(records.get_or_create_scope, "key-a", "chat", None, 1.0)
    b = store.write_sync(records.get_or_create_scope, "key-b", "chat", None, 1.0)
    day = 86400.0
    for i in range(5):
        store.write_sync(jobs.log_request, f"a{i}", a.id, {"n": i}, 10 * day + i)
    store.write_sync(jobs.log_request, "b0", b.id, {"n": 0}, 10 * day)
    store.write_sync(jobs.log_request, "old", a.id, {}, 1 * day)
    assert store.read_sync(jobs.get_request, "key-a", "a1").detail == {"n": 1}
    assert store.read_sync(jobs.get_request, "key-b", "a1") is None
    assert store.read_sync(jobs.get_request, None, "a1") is not None
    listed = store.read_sync(jobs.list_requests, a.id, limit=3)
    assert [r.id for r in listed] == ["a4", "a3", "a2"]
    deleted = store.write_sync(jobs.prune_requests, 7, 3, 11 * day)
    assert deleted == 3  # 'old' by age, a0 and a1 beyond the newest three
    assert [r.id for r in store.read_sync(jobs.list_requests, a.id)] == ["a4", "a3", "a2"]
    assert [r.id for r in store.read_sync(jobs.list_requests, b.id)] == ["b0"]


# -- deleting a scope --------------------------------------------------------------


def test_delete_scope_removes_everything_of_it(store: Store) -> None:
    keep = store.write_sync(records.get_or_create_scope, "", "keep", None, 1.0)
    gone = store.write_sync(records.get_or_create_scope, "", "gone", None, 1.0)
    for scope in (keep, gone):
        msgs = _messages(store, scope.id, ["hello there", "general kenobi"])
        store.write_sync(
            records.insert_memories,
            [NewMemory(scope.id, "turn", "hello there kenobi", 1.0, sources=msgs)],
            1.0,
        )
        store.write_sync(scope_state.save_summary, scope.id, "they met", 2, 1.0)
        store.write_sync(scope_state.set_style, scope.id, "hello there", "auto", 1.0, msgs[0])
        store.write_sync(jobs.enqueue, "embed", {}, scope.id, 1.0)
        store.write_sync(jobs.log_request, f"r{scope.id}", scope.id, {}, 1.0)
    assert store.write_sync(records.delete_scope, gone.id)
    assert not store.write_sync(records.delete_scope, gone.id)
    for table in ("messages", "memories", "summaries", "style", "jobs", "requests"):
        left = store.read_sync(
            lambda c, t=table: c.execute(f"SELECT DISTINCT scope_id FROM {t}").fetchall()
        )
        assert left == [(keep.id,)], table
    assert store.read_sync(_count, "memory_sources") == 2
    fts = store.read_sync(
        lambda c: c.execute(
            "SELECT rowid FROM memories_fts WHERE memories_fts MATCH 'kenobi'"
        ).fetchall()
    )
    assert len(fts) == 1


def test_a_deleted_scopes_id_is_never_reused(store: Store) -> None:
    first = store.write_sync(records.get_or_create_scope, "key-a", "chat", None, 1.0)
    store.write_sync(records.delete_scope, first.id)
    second = store.write_sync(records.get_or_create_scope, "key-b", "chat", None, 2.0)
    assert second.id != first.id
    assert store.read_sync(records.get_scope_by_id, "key-a", second.id) is None


def test_a_deleted_memorys_id_is_never_reused(store: Store) -> None:
    # A retried DELETE, or a stale page in a UI, must find nothing, not the next memory.
    a = store.write_sync(records.get_or_create_scope, "", "a", None, 1.0)
    b = store.write_sync(records.get_or_create_scope, "", "b", None, 1.0)

    def add(scope_id: int, text: str) -> int:
        (memory_id,) = store.write_sync(
            records.insert_memories, [NewMemory(scope_id, "note", text, 1.0)], 1.0
        )
        return memory_id

    first, newest = add(a.id, "kept"), add(a.id, "deleted")
    assert store.write_sync(records.delete_memory, a.id, newest)
    again = add(a.id, "new in the same scope")
    assert again > newest
    assert not store.write_sync(records.delete_memory, a.id, newest)  # the retry
    assert store.read_sync(records.get_memory, a.id, again).text == "new in the same scope"
    # Nor after the newest ones went with their scope, nor in another scope.
    top = add(b.id, "b's")
    assert store.write_sync(records.delete_scope, b.id)
    assert add(a.id, "after the scope") > top > first
