"""The background worker: one object, owned by the app's lifespan, fed by the jobs table.

It works two lanes, each one task, so that a slow model never holds up embedding:

- embed: new memories are embedded in batches (`embed` jobs); memories still without
  a vector (after a change of embedding model, say) are swept up as well;
- llm: jobs that ask the memory model, one at a time, dispatched by kind to their
  handlers: `extract` (facts, `proxy.memory.facts`), `summarize` (the rolling summary,
  `proxy.memory.summary`) and `reflect` (insights, `proxy.memory.reflect`). Their
  requests go through the upstream gate, so a user's request always goes first: a job
  that a user's request preempts is requeued without counting an attempt; an upstream
  that fails is retried with backoff, then given up with the error kept on the job;
  a model whose answers stay unusable fails the job at once (the raw turns are
  remembered all the same). A failing job never blocks the queue.

Work is durable: jobs are rows, so a crash leaves them queued and they resume at the
next start (`requeue_running`). Both lanes wait while requests are being prepared, so
a query embedding never queues behind background work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.memory import jobs, vectors
from proxy.memory.db import Connection
from proxy.memory.embed import Embedder
from proxy.memory.facts import EXTRACT_JOB, handle_extract
from proxy.memory.llm import BadOutput, MemoryModel, WontFit
from proxy.memory.prompts import DEFAULT_PROMPTS, Prompts
from proxy.memory.record import EMBED_JOB
from proxy.memory.records import chunked, placeholders
from proxy.memory.reflect import REFLECT_JOB, handle_reflect
from proxy.memory.schedule import BackgroundConfig, JobContext
from proxy.memory.store import Store
from proxy.memory.summary import SUMMARIZE_JOB, handle_summarize
from proxy.upstreams.gate import Preempted

log = logging.getLogger("mnemoproxy.worker")

MAX_ATTEMPTS = 5

Handler = Callable[[jobs.Job, JobContext], Awaitable[None]]
HANDLERS: dict[str, Handler] = {
    EXTRACT_JOB: handle_extract,
    SUMMARIZE_JOB: handle_summarize,
    REFLECT_JOB: handle_reflect,
}


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
    """Embeds queued memories and runs the memory model's jobs, until stopped."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        activity: Activity,
        *,
        model: MemoryModel | None = None,
        config: BackgroundConfig | None = None,
        prompts: Prompts = DEFAULT_PROMPTS,
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
        self.preempted = 0  # jobs that gave way to a user's request
        self.config = config or BackgroundConfig()
        self.context: JobContext | None = None
        if model is not None:
            self.context = JobContext(
                store=store,
                model=model,
                config=self.config,
                prompts=prompts,
                clock=clock,
                wake=self.wake,
            )
        self._wake = asyncio.Event()
        self._wake_llm = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._embedder_ready = asyncio.Event()
        self._next_due: float | None = None  # when the next job waiting for a retry is due

    def wake(self) -> None:
        """New work was queued: look now instead of at the next poll."""
        self._wake.set()
        self._wake_llm.set()

    def embedder_ready(self) -> None:
        """The embedding model is loaded; start embedding."""
        self._embedder_ready.set()
        if self.context is not None:
            self.context.embedder = self.embedder
        self._wake.set()

    async def start(self) -> None:
        """Put jobs a crash left running back in the queue and start the lanes."""
        await self.store.write(jobs.requeue_running, self.clock())
        self._tasks = [asyncio.create_task(self._run_embed(), name="mnemoproxy-embed")]
        if self.context is not None and self.config.enabled:
            self._tasks.append(asyncio.create_task(self._run_llm(), name="mnemoproxy-llm"))

    async def stop(self) -> None:
        """Stop both lanes; a job in progress is picked up again at the next start."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the embed lane ------------------------------------------------------------

    async def _run_embed(self) -> None:
        await self._embedder_ready.wait()
        reset = await self.store.write(
            vectors.ensure_embedding_model, self.embedder.model_id, self.embedder.dim
        )
        if reset:
            log.warning(
                "embedding model changed to %s: re-embedding every memory", self.embedder.model_id
            )
        await self._loop(self.run_once, self._wake)

    async def _loop(
        self,
        step: Callable[[], Awaitable[int]],
        wake: asyncio.Event,
        next_due: Callable[[], float | None] = lambda: None,
    ) -> None:
        """Run `step` while it finds work; then wait to be woken, for the next retry
        that falls due, or for the next poll."""
        while True:
            wake.clear()  # before looking, so that work queued meanwhile is not missed
            try:
                done = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the worker die; say why and back off
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("background worker failed; retrying")
                done = 0
                await asyncio.sleep(min(60.0, 2.0 ** min(self.failures, 6)))
            if not done:
                due = next_due()
                wait = self.idle_wait if due is None else min(self.idle_wait, due - self.clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, wait))

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
        scopes = await self.store.write(
            _store_and_finish, self.embedder.model_id, pairs, [job.id for job in claimed], now
        )
        try:  # the next request's search then finds the scope's new vectors cached
            await self.store.read(vectors.warm, scopes)
        except Exception:  # only a cache: the search builds it itself if need be
            log.debug("could not warm the vector cache of scopes %s", scopes, exc_info=True)
        return len(batch)

    # -- the llm lane --------------------------------------------------------------

    async def _run_llm(self) -> None:
        await self._loop(self.run_llm_once, self._wake_llm, lambda: self._next_due)

    async def run_llm_once(self) -> int:
        """Run one job of the memory model; return 1 if there was one, else 0."""
        context = self.context
        assert context is not None, "no memory model: the llm lane is off"
        await self.activity.wait_idle()
        claimed = await self.store.write(jobs.claim, list(HANDLERS), self.clock(), 1)
        if not claimed:
            self._next_due = await self.store.read(_next_due, list(HANDLERS))
            return 0
        job = claimed[0]
        try:
            await HANDLERS[job.kind](job, context)
        except Preempted:
            # A user's request took the slot: not a failure, run it again when free.
            self.preempted += 1
            await self.store.write(jobs.requeue, job.id, self.clock())
            return 1
        except (BadOutput, WontFit) as exc:  # asking again would not help
            log.warning("job %s (%s) gave up: %s", job.id, job.kind, exc)
            await self.store.write(jobs.fail, job.id, str(exc)[:2000], self.clock(), None)
            return 1
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            retry = None
            if job.attempts < self.config.max_attempts:
                delay = min(3600.0, self.config.backoff_seconds * 2.0 ** (job.attempts - 1))
                retry = self.clock() + delay
            log.warning(
                "job %s (%s) failed (attempt %s): %s%s",
                job.id,
                job.kind,
                job.attempts,
                error,
                "" if retry is None else f"; retrying in {retry - self.clock():.0f} s",
            )
            await self.store.write(jobs.fail, job.id, error, self.clock(), retry)
            return 1
        await self.store.write(jobs.finish, job.id, self.clock())
        return 1


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


def _next_due(conn: Connection, kinds: list[str]) -> float | None:
    """When the earliest pending job of `kinds` is due (a retry after backoff)."""
    return conn.execute(
        f"SELECT min(run_after) FROM jobs WHERE state = 'pending'"
        f" AND kind IN ({placeholders(kinds)})",
        kinds,
    ).fetchone()[0]


def _store_and_finish(
    conn: Connection, model_id: str, pairs: list[tuple[int, Any]], job_ids: list[int], now: float
) -> list[int]:
    """Store the vectors, finish the jobs; the scopes whose vectors changed."""
    vectors.store_vectors(conn, model_id, pairs)
    for job_id in job_ids:
        jobs.finish(conn, job_id, now)
    ids = [memory_id for memory_id, _ in pairs]
    scopes: set[int] = set()
    for chunk in chunked(ids):
        scopes.update(
            r[0]
            for r in conn.execute(
                f"SELECT DISTINCT scope_id FROM memories WHERE id IN ({placeholders(chunk)})",
                chunk,
            )
        )
    return sorted(scopes)


def _fail_jobs(conn: Connection, claimed: list[jobs.Job], exc: Exception, now: float) -> None:
    """Back off and retry; after MAX_ATTEMPTS give up, keeping the error for the API."""
    for job in claimed:
        retry = now + 2.0**job.attempts if job.attempts < MAX_ATTEMPTS else None
        jobs.fail(conn, job.id, f"{type(exc).__name__}: {exc}", now, retry)
