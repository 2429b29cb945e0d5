"""Who may use an upstream now: the user's requests first, background jobs when there is room.

A local server (llama.cpp, Ollama, LM Studio) usually serves one request at a time; a
summary job running there would make the user wait for it. So each upstream has a
number of `slots` (1 by default: a single-slot local server). A background job runs
only while the user's requests leave a slot free, and a user request that arrives when
every slot is taken preempts a running job: the job's HTTP request is cancelled at
once (the server stops generating it) and the job is retried later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping


class Preempted(Exception):
    """A background job gave way to a user's request; retry it later (not a failure)."""


class UpstreamGate:
    """Tracks user requests and background jobs per upstream (see the module docstring)."""

    def __init__(self, slots: Mapping[str, int] | None = None, default_slots: int = 1):
        self._slots = dict(slots or {})
        self._default = max(1, default_slots)
        self._users: Counter[str] = Counter()
        self._jobs: dict[str, set[asyncio.Task[object]]] = {}
        self._preempted: set[asyncio.Task[object]] = set()
        self._changed = asyncio.Event()  # replaced on every change; waiters re-check

    def slots(self, upstream: str) -> int:
        """How many requests the upstream serves at once."""
        return max(1, self._slots.get(upstream, self._default))

    def busy(self, upstream: str) -> int:
        """User requests in flight on the upstream."""
        return self._users[upstream]

    @contextlib.contextmanager
    def user(self, upstream: str) -> Iterator[None]:
        """Hold a slot for a user's request, preempting background jobs if none is free."""
        self._users[upstream] += 1
        jobs = self._jobs.get(upstream, set())
        overflow = self._users[upstream] + len(jobs) - self.slots(upstream)
        for task in list(jobs)[: max(0, overflow)]:
            self._preempted.add(task)
            task.cancel()
        try:
            yield
        finally:
            self._users[upstream] -= 1
            if self._users[upstream] <= 0:
                del self._users[upstream]
            self._notify()

    @contextlib.asynccontextmanager
    async def background(self, upstream: str) -> AsyncIterator[None]:
        """Run a background job's request when a slot is free; raises Preempted if a user
        request takes the slot back while it runs."""
        task = asyncio.current_task()
        assert task is not None
        while self._users[upstream] + len(self._jobs.get(upstream, ())) >= self.slots(upstream):
            await self._changed.wait()
        self._jobs.setdefault(upstream, set()).add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._preempted:
                raise
            task.uncancel()
            raise Preempted(f"a user's request needed upstream {upstream!r}") from None
        finally:
            self._jobs[upstream].discard(task)
            self._preempted.discard(task)
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
