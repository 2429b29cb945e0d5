"""The memory store: one writer thread, a small pool of reader threads, one SQLite file.

Shape taken from datasette's ``database.py``: a dedicated thread owns the only write
connection and runs writes one at a time, in submission order, each in its own
``BEGIN IMMEDIATE`` transaction; reads run on reader threads, each with its own
read-only connection (WAL: readers never block the writer, nor it them). The event
loop only enqueues work and awaits a future, so it is never blocked.

Operations are plain functions ``fn(conn, *args)`` (``proxy.memory.records`` and
friends); the store only decides where and in which transaction they run::

    store = Store(path)
    await store.start()
    scope = await store.write(records.get_or_create_scope, owner, name, label, now)
    hits = await store.read(vectors.knn, scope.id, query_vec, 10)
    await store.close()

The same object works without an event loop (CLI, scripts, tests)::

    with Store.open_sync(path) as store:
        store.write_sync(fn, ...)

A write, once submitted, always runs: cancelling the awaiting task (a client that
went away) does not cancel it; only the caller stops waiting. A write is committed
when its awaitable resolves. An operation must not call the store itself, and must
return plain values (rows fetched, not a live cursor: the transaction ends with it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from proxy.memory.db import (
    DEFAULT_BUSY_TIMEOUT_MS,
    Connection,
    StoreClosed,
    StoreLocked,
    is_locked_error,
    open_connection,
    sqlite_driver,
    translate_error,
)
from proxy.memory.migrations import migrate

P = ParamSpec("P")
T = TypeVar("T")

_Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], concurrent.futures.Future[Any]]
_STOP = None  # queue sentinel: the thread closes its connection and exits


class Store:
    """The SQLite memory store: ``write`` on one thread in order, ``read`` on a pool."""

    def __init__(
        self,
        path: Path | str,
        *,
        readers: int = 2,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        if readers < 1:
            raise ValueError("a store needs at least one reader thread")
        self.path = Path(path)
        self.readers = readers
        self.busy_timeout_ms = busy_timeout_ms
        self.schema_version = 0
        self._writes: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._reads: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._state = "new"  # new -> open -> closed
        self._pending_writes = 0

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the writer connection on its thread and migrate the file.

        Opening errors (StoreError, StoreLocked, StoreTooNew) propagate here.
        """
        await _wait(self._begin())

    def start_sync(self) -> None:
        """``start`` for callers without an event loop."""
        self._begin().result()

    @classmethod
    def open_sync(cls, path: Path | str, *, readers: int = 1, **kwargs: Any) -> Store:
        """A started store, for the CLI and scripts; close it with ``close_sync``."""
        store = cls(path, readers=readers, **kwargs)
        store.start_sync()
        return store

    async def close(self) -> None:
        """Finish every queued read and write, close all connections, join the threads."""
        if self._stop():
            await asyncio.to_thread(self._shutdown)

    def close_sync(self) -> None:
        """``close`` for callers without an event loop."""
        if self._stop():
            self._shutdown()

    async def __aenter__(self) -> Store:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> Store:
        if self._state == "new":
            self.start_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()

    @property
    def pending_writes(self) -> int:
        """Writes submitted and not yet finished (for metrics)."""
        return self._pending_writes

    # -- running operations ------------------------------------------------------

    async def write(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in one write transaction; return its result.

        Writes run one at a time in submission order. If ``fn`` raises, the
        transaction is rolled back (nothing of it is kept) and the error is raised here.
        """
        return await _wait(self._submit(self._writes, fn, args, kwargs))

    def write_sync(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``write`` for callers without an event loop (blocks until committed)."""
        return self._submit(self._writes, fn, args, kwargs).result()

    async def read(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(conn, *args, **kwargs)`` on a reader thread, in one read snapshot."""
        return await _wait(self._submit(self._reads, fn, args, kwargs))

    def read_sync(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``read`` for callers without an event loop."""
        return self._submit(self._reads, fn, args, kwargs).result()

    # -- internals ---------------------------------------------------------------

    def _begin(self) -> concurrent.futures.Future[None]:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"store {self.path} was already started")
            self._state = "open"
            opened: concurrent.futures.Future[None] = concurrent.futures.Future()
            writer = threading.Thread(
                target=self._write_loop, args=(opened,), name="store-writer", daemon=True
            )
            self._threads.append(writer)
            for i in range(self.readers):
                self._threads.append(
                    threading.Thread(target=self._read_loop, name=f"store-reader-{i}", daemon=True)
                )
            for thread in self._threads:
                thread.start()
        return opened

    def _submit(
        self,
        tasks: queue.SimpleQueue[_Task | None],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._state != "open":
                raise StoreClosed(f"the memory store {self.path} is {self._state}, not open")
            if tasks is self._writes:
                self._pending_writes += 1
            tasks.put((fn, args, kwargs, future))
        return future

    def _stop(self) -> bool:
        """Refuse new work; True if this call must shut the threads down."""
        with self._lock:
            was_open = self._state == "open"
            self._state = "closed"
            return was_open

    def _shutdown(self) -> None:
        # FIFO queues: everything submitted before the sentinels runs first. Readers
        # close before the writer so that the writer's connection is the last one:
        # closing it checkpoints the WAL into the database file and removes it.
        writer, *readers = self._threads
        for _ in readers:
            self._reads.put(_STOP)
        _join(readers)
        self._writes.put(_STOP)
        _join([writer])

    def _write_loop(self, opened: concurrent.futures.Future[None]) -> None:
        try:
            conn = open_connection(self.path, busy_timeout_ms=self.busy_timeout_ms, check=True)
            try:
                self.schema_version = migrate(conn, self.path)
            except sqlite_driver().Error as exc:
                conn.close()
                raise translate_error(exc, self.path) from exc
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            with self._lock:
                self._state = "closed"
                for _ in range(self.readers):
                    self._reads.put(_STOP)
            _fail_queued(self._writes, exc)
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            while (task := self._writes.get()) is not _STOP:
                fn, args, kwargs, future = task
                try:
                    _run(conn, "BEGIN IMMEDIATE", fn, args, kwargs, future, self.path)
                finally:
                    with self._lock:
                        self._pending_writes -= 1
        finally:
            _close(conn, optimize=True)

    def _read_loop(self) -> None:
        conn: Connection | None = None
        try:
            while (task := self._reads.get()) is not _STOP:
                fn, args, kwargs, future = task
                if not future.set_running_or_notify_cancel():
                    continue
                if conn is None:
                    try:
                        conn = open_connection(
                            self.path, readonly=True, busy_timeout_ms=self.busy_timeout_ms
                        )
                    except BaseException as exc:
                        future.set_exception(exc)
                        continue
                _run(conn, "BEGIN", fn, args, kwargs, future, self.path, started=True)
        finally:
            if conn is not None:
                _close(conn, optimize=False)


def _run(
    conn: Connection,
    begin: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    future: concurrent.futures.Future[Any],
    path: Path,
    *,
    started: bool = False,
) -> None:
    """Run one operation in its own transaction and settle its future."""
    if not started and not future.set_running_or_notify_cancel():
        return
    try:
        try:
            conn.execute(begin)
        except sqlite_driver().OperationalError as exc:
            if is_locked_error(exc):
                raise StoreLocked(
                    f"the memory store {path} is locked by another process: {exc}"
                ) from exc
            raise
        try:
            result = fn(conn, *args, **kwargs)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def _wait(future: concurrent.futures.Future[T]) -> T:
    """Await a thread's future without letting a cancelled awaiter cancel the work."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[T] = loop.create_future()

    def settle(done: concurrent.futures.Future[T]) -> None:
        if waiter.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def relay(done: concurrent.futures.Future[T]) -> None:
        # A closed loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, done)

    future.add_done_callback(relay)
    return await waiter


def _fail_queued(tasks: queue.SimpleQueue[_Task | None], exc: BaseException) -> None:
    while True:
        try:
            task = tasks.get_nowait()
        except queue.Empty:
            return
        if task is not None and task[3].set_running_or_notify_cancel():
            task[3].set_exception(exc)


def _close(conn: Connection, *, optimize: bool) -> None:
    if optimize:
        # A hint to the query planner; closing must not fail because of it.
        with contextlib.suppress(Exception):
            conn.execute("PRAGMA optimize")
    conn.close()


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()
