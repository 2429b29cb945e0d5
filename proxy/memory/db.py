"""Opening the SQLite file: driver choice, sqlite-vec, pragmas, and start-up errors.

The error tree of the store is written down here once:

- ``StoreError``: the store cannot be used (corrupted file, not our database,
  no SQLite driver that can load extensions, ...). Its message names the path.
  - ``StoreLocked``: another process holds the write lock longer than the busy timeout.
  - ``StoreTooNew``: the file was written by a newer mnemoproxy (schema version above ours).
  - ``StoreClosed``: the ``Store`` was used after ``close()``.

Nothing here runs at import time; the driver is chosen on the first open.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

# Identifies our files in the SQLite header ("MNEM"), so that we never migrate
# another application's database into a memory store.
APPLICATION_ID = 0x4D4E454D
DEFAULT_BUSY_TIMEOUT_MS = 5000
# Negative cache_size is KiB: 32 MiB of page cache per connection.
CACHE_SIZE_KIB = 32 * 1024

# A connection of whichever driver was chosen (stdlib sqlite3 or pysqlite3); both
# follow the DB-API of the stdlib module.
Connection = Any


class StoreError(Exception):
    """The memory store cannot be opened or used; the message says why and where."""


class StoreLocked(StoreError):
    """Another process holds the database's write lock beyond the busy timeout."""


class StoreTooNew(StoreError):
    """The database was written by a newer mnemoproxy than this one."""


class StoreClosed(StoreError):
    """The store was used after it was closed."""


@functools.cache
def sqlite_driver() -> ModuleType:
    """The DB-API module to use: stdlib ``sqlite3`` if it can load extensions, else pysqlite3.

    Raises StoreError when neither can load extensions (sqlite-vec is one).
    """
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        from pysqlite3 import dbapi2  # type: ignore[import-not-found]
    except ImportError:
        raise StoreError(
            "this Python's sqlite3 module cannot load extensions (sqlite-vec) and "
            "pysqlite3 is not installed; install it with `pip install pysqlite3` "
            "(or use a Python built with loadable SQLite extensions)"
        ) from None
    return dbapi2


@functools.cache
def _connection_class() -> type:
    """The driver's Connection, subclassed so that it can carry per-connection caches
    (``proxy.memory.vectors`` keeps the scopes' packed bits there)."""
    base = sqlite_driver().Connection

    class StoreConnection(base):  # type: ignore[misc, valid-type]
        """A connection of the memory store."""

    return StoreConnection


def open_connection(
    path: Path | str,
    *,
    readonly: bool = False,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    check: bool = False,
) -> Connection:
    """Open one connection to the store at ``path``, with sqlite-vec loaded.

    The connection is in autocommit mode (``isolation_level=None``): callers begin
    their own transactions. Pragmas: WAL, synchronous=NORMAL (with WAL a killed
    process loses nothing committed; only a power cut can lose the last commits),
    foreign keys on, a busy timeout, a 32 MiB page cache.

    ``readonly`` opens with ``mode=ro`` (the reader pool); it never creates the file.
    ``check`` runs ``PRAGMA quick_check`` (the writer does it once at start).

    Raises StoreError for a file that is not a usable SQLite database, StoreLocked
    when another process holds a lock beyond the busy timeout.
    """
    path = Path(path)
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
    driver = sqlite_driver()
    try:
        if readonly:
            conn = driver.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=busy_timeout_ms / 1000,
                factory=_connection_class(),
            )
        else:
            conn = driver.connect(
                str(path),
                isolation_level=None,
                check_same_thread=False,
                timeout=busy_timeout_ms / 1000,
                factory=_connection_class(),
            )
    except driver.Error as exc:
        raise translate_error(exc, path) from exc
    try:
        _load_sqlite_vec(conn, path)
        _configure(conn, readonly=readonly, busy_timeout_ms=busy_timeout_ms)
        if check:
            quick_check(conn, path)
        if readonly:  # readers never write, so they may share caches of what they read
            conn._mnemo_shared_key = str(path.resolve())
    except BaseException as exc:
        conn.close()
        if isinstance(exc, driver.Error):
            raise translate_error(exc, path) from exc
        raise
    return conn


def quick_check(conn: Connection, path: Path | str) -> None:
    """Raise StoreError naming ``path`` unless ``PRAGMA quick_check`` says ok."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in rows[:5])
        raise StoreError(
            f"the memory store {path} is corrupted (quick_check: {problems}); "
            "restore it from a backup or move it away to start a new one"
        )


def is_locked_error(exc: BaseException) -> bool:
    """Whether a driver error means the database is busy or locked by someone else."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _load_sqlite_vec(conn: Connection, path: Path) -> None:
    import sqlite_vec

    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
    except Exception as exc:
        raise StoreError(f"cannot load the sqlite-vec extension for {path}: {exc}") from exc
    finally:
        conn.enable_load_extension(False)


def _configure(conn: Connection, *, readonly: bool, busy_timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # The first read of the file: "file is not a database" surfaces here.
    conn.execute("PRAGMA schema_version").fetchone()
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot switch {conn!r} to WAL journal mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA cache_size = -{CACHE_SIZE_KIB}")
    conn.execute("PRAGMA temp_store = MEMORY")
    # Our triggers write to the FTS5 virtual table; a SQLite built with
    # trusted_schema off would refuse that. The file is our own, so trust it.
    conn.execute("PRAGMA trusted_schema = ON")


def translate_error(exc: Exception, path: Path | str) -> StoreError:
    """Turn a driver error met while opening into StoreLocked or StoreError."""
    if is_locked_error(exc):
        return StoreLocked(
            f"the memory store {path} is locked by another process "
            f"(is another mnemoproxy running on it?): {exc}"
        )
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StoreError(
            f"the memory store {path} is not a valid SQLite database or is corrupted "
            f"({exc}); restore it from a backup or move it away to start a new one"
        )
    if "unable to open" in text:
        return StoreError(f"cannot open the memory store {path}: {exc}")
    return StoreError(f"cannot use the memory store {path}: {exc}")
