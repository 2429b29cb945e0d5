"""The background worker: one task, owned by the app's lifespan, fed by the jobs table.

It embeds new memories in batches. Work is durable: jobs are rows, so a crash leaves
them queued and they resume at the next start (`requeue_running`); memories still
without a vector (after a change of embedding model, say) are swept up as well.
A user's request always goes first: the worker waits while requests are being
prepared, so a query embedding never queues behind a background batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.memory import jobs, vectors
from proxy.memory.db import Connection
from proxy.memory.embed import Embedder
from proxy.memory.record import EMBED_JOB
from proxy.memory.records import chunked, placeholders
from proxy.memory.store import Store

log = logging.getLogger("mnemoproxy.worker")

MAX_ATTEMPTS = 5


class Activity:
    """Counts requests in flight, so background work can wait for a quiet moment."""

    def __init__(self) -> None:
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> Activity:
        self._busy += 1
        self._idle.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return when no request is being prepared."""
        await self._idle.wait()


@dataclass(frozen=True)
class ToEmbed:
    """A memory and the text its vector is made from."""

    id: int
    key: str


def embedding_key(text: str, speaker: str | None) -> str:
    """The text a memory is embedded as: with its speaker, so "what did Tom say" finds it."""
    return f"{speaker}: {text}" if speaker else text


class Worker:
    """Embeds queued memories, one batch at a time, until stopped."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        activity: Activity,
        *,
        batch_size: int = 64,
        idle_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.activity = activity
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        self.clock = clock
        self.failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._embedder_ready = asyncio.Event()

    def wake(self) -> None:
        """New work was queued: look now instead of at the next poll."""
        self._wake.set()

    def embedder_ready(self) -> None:
        """The embedding model is loaded; start embedding."""
        self._embedder_ready.set()
        self._wake.set()

    async def start(self) -> None:
        """Put jobs a crash left running back in the queue and start the loop."""
        await self.store.write(jobs.requeue_running, self.clock())
        self._task = asyncio.create_task(self._run(), name="mnemoproxy-worker")

    async def stop(self) -> None:
        """Stop after the batch in progress."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await self._embedder_ready.wait()
        reset = await self.store.write(
            vectors.ensure_embedding_model, self.embedder.model_id, self.embedder.dim
        )
        if reset:
            log.warning(
                "embedding model changed to %s: re-embedding every memory", self.embedder.model_id
            )
        while True:
            try:
                done = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the worker die; say why and back off
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("background worker failed; retrying")
                done = 0
                await asyncio.sleep(min(60.0, 2.0 ** min(self.failures, 6)))
            if not done:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.idle_wait)

    async def run_once(self) -> int:
        """Embed one batch of queued memories; return how many were embedded."""
        await self.activity.wait_idle()
        now = self.clock()
        claimed = await self.store.write(jobs.claim, [EMBED_JOB], now, 16)
        wanted = [i for job in claimed for i in job.payload.get("memory_ids", ())]
        batch = await self.store.read(_load_to_embed, wanted, self.batch_size)
        if not batch:
            for job in claimed:
                await self.store.write(jobs.finish, job.id, now)
            return 0
        try:
            matrix = await self.embedder.embed([item.key for item in batch])
        except Exception as exc:
            await self.store.write(_fail_jobs, claimed, exc, now)
            raise
        pairs = [(item.id, matrix[i]) for i, item in enumerate(batch)]
        await self.store.write(
            _store_and_finish, self.embedder.model_id, pairs, [job.id for job in claimed], now
        )
        return len(batch)


def _load_to_embed(conn: Connection, wanted: list[int], limit: int) -> list[ToEmbed]:
    """The claimed memories still needing a vector, then any other unembedded ones."""
    rows: list[Any] = []
    for chunk in chunked(wanted):
        rows += conn.execute(
            f"SELECT id, text, speaker FROM memories WHERE embedded = 0 AND state = 'active'"
            f" AND id IN ({placeholders(chunk)})",
            chunk,
        ).fetchall()
    if len(rows) < limit:
        seen = {r[0] for r in rows}
        rows += [
            r
            for r in conn.execute(
                "SELECT id, text, speaker FROM memories WHERE embedded = 0 AND state = 'active'"
                " ORDER BY id LIMIT ?",
                (limit,),
            )
            if r[0] not in seen
        ][: limit - len(rows)]
    return [ToEmbed(r[0], embedding_key(r[1], r[2])) for r in rows]


def _store_and_finish(
    conn: Connection, model_id: str, pairs: list[tuple[int, Any]], job_ids: list[int], now: float
) -> None:
    vectors.store_vectors(conn, model_id, pairs)
    for job_id in job_ids:
        jobs.finish(conn, job_id, now)


def _fail_jobs(conn: Connection, claimed: list[jobs.Job], exc: Exception, now: float) -> None:
    """Back off and retry; after MAX_ATTEMPTS give up, keeping the error for the API."""
    for job in claimed:
        retry = now + 2.0**job.attempts if job.attempts < MAX_ATTEMPTS else None
        jobs.fail(conn, job.id, f"{type(exc).__name__}: {exc}", now, retry)
