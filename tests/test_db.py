"""Opening the store file: pragmas, migrations, and the errors a user can meet at start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.memory import records
from proxy.memory.db import (
    StoreError,
    StoreLocked,
    StoreTooNew,
    open_connection,
    sqlite_driver,
)
from proxy.memory.migrations import latest_version, migrate, schema_version
from proxy.memory.store import Store


def test_open_creates_parent_dir_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "memory.db"
    conn = open_connection(path)
    try:
        assert path.exists()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert conn.execute("SELECT vec_version()").fetchone()[0].startswith("v")
    finally:
        conn.close()


def test_migrations_from_empty_then_idempotent(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "m.db")
    try:
        assert schema_version(conn) == 0
        assert migrate(conn) == latest_version()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        for name in ("meta", "scopes", "messages", "memories", "memory_sources", "embeddings"):
            assert name in tables
        for name in ("memories_fts", "summaries", "style", "jobs", "requests"):
            assert name in tables
        assert migrate(conn) == latest_version()  # a second run changes nothing
    finally:
        conn.close()


def test_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with Store.open_sync(path) as store:
        store.write_sync(records.get_or_create_scope, "", "chat", "Alice", 1.0)
    with Store.open_sync(path) as store:
        scope = store.read_sync(records.get_scope, "", "chat")
    assert scope is not None and scope.label == "Alice"


def test_newer_schema_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with Store.open_sync(path) as store:
        store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
    conn = open_connection(path)
    conn.execute(f"PRAGMA user_version = {latest_version() + 1}")
    conn.close()
    with pytest.raises(StoreTooNew, match="newer"):
        Store.open_sync(path)
    conn = open_connection(path)
    try:  # untouched: still the newer version, data still there
        assert schema_version(conn) == latest_version() + 1
        assert conn.execute("SELECT count(*) FROM scopes").fetchone()[0] == 1
    finally:
        conn.close()


def test_garbage_file_is_an_error_not_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    garbage = b"this is not a database\x00" * 500
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match=str(path)):
        Store.open_sync(path)
    assert path.read_bytes() == garbage


def test_damaged_database_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with Store.open_sync(path) as store:
        scope = store.write_sync(records.get_or_create_scope, "", "chat", None, 1.0)
        rows = [
            records.NewMessage("user", f"message {i} " * 50, f"fp{i}", float(i)) for i in range(400)
        ]
        store.write_sync(records.append_messages, scope.id, rows, None)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    for offset in range(3 * page, len(data) - page, 5 * page):
        data[offset + 100 : offset + 400] = b"\xa5" * 300  # scribble inside pages
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(path)):
        Store.open_sync(path)


def test_async_start_reports_the_error(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    path.write_bytes(b"\x01" * 8192)

    async def scenario() -> None:
        store = Store(path)
        with pytest.raises(StoreError, match="not a valid SQLite database"):
            await store.start()
        await store.close()  # closing a store that failed to start is harmless

    asyncio.run(scenario())


def test_other_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite_driver().connect(str(path))
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a memory store"):
        Store.open_sync(path)


_HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from proxy.memory.db import open_connection
    conn = open_connection(sys.argv[1])
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE IF NOT EXISTS held (x)")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    """
)


def test_database_locked_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    Store.open_sync(path).close_sync()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match="locked"):
            Store.open_sync(path, busy_timeout_ms=200)
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=10)
        assert holder.stdout is not None
        holder.stdout.close()
    Store.open_sync(path).close_sync()  # free again: opens fine
