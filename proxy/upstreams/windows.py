"""The context window of each (upstream, model): config, else the server, else a default.

Asking the server costs a round trip or two, so answers are cached, and concurrent
requests for the same model share one lookup. No answer is cached too, so that a server
that cannot tell is not asked on every request, but briefly: a server still loading
(started after the proxy, as llama.cpp often is) must not be budgeted with the default
for long.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.discovery import context_window
from proxy.upstreams.registry import Upstream


@dataclass(frozen=True)
class Window:
    """A context size in tokens and where it came from."""

    tokens: int
    source: str


class ContextWindows:
    """Resolves and caches context windows."""

    def __init__(
        self, pool: UpstreamPool, default: int, *, ttl: float = 600.0, unknown_ttl: float = 30.0
    ):
        self.pool = pool
        self.default = default
        self.ttl = ttl
        self.unknown_ttl = unknown_ttl
        self._cache: dict[tuple[str, str | None], tuple[float, Window]] = {}
        self._pending: dict[tuple[str, str | None], asyncio.Task[Window]] = {}

    async def get(self, upstream: Upstream, model: str | None) -> Window:
        """The window for `model` on `upstream`."""
        if upstream.context_window:
            return Window(upstream.context_window, "config")
        key = (upstream.name, model)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(upstream, model))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(task)

    async def _ask(self, upstream: Upstream, model: str | None) -> Window:
        found = await context_window(self.pool, upstream, model, timeout=2.0)
        window = Window(*found) if found else Window(self.default, "default")
        ttl = self.ttl if found else self.unknown_ttl
        self._cache[(upstream.name, model)] = (time.monotonic() + ttl, window)
        return window
