"""What the memory layer decides for one chat request, as the chat route consumes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.routes.auth import Identity
from proxy.upstreams.registry import Route
from proxy.upstreams.sse import ReplyAccumulator


class ChatPlan(Protocol):
    """The prepared request: the body to send (None = unchanged), the response headers,
    and how to record the reply afterwards."""

    body: dict[str, Any] | None
    headers: dict[str, str]

    @property
    def wants_usage(self) -> bool:
        """Whether the reply's token usage is wanted (it calibrates the token budget): a
        stream is then asked for it, and the client gets it only if it asked too."""

    async def record(self, reply: ReplyAccumulator, *, partial: bool) -> None:
        """Store the turn once the reply is known. Never raises."""


class Memory(Protocol):
    """The memory layer as the chat route sees it."""

    async def prepare(
        self,
        *,
        identity: Identity,
        path_scope: str | None,
        headers: Mapping[str, str],
        body: dict[str, Any],
        route: Route,
    ) -> ChatPlan:
        """Steps 3-7 of a request: scope, transcript, recall, budget, prompt. Fail-open."""


@dataclass
class UnchangedPlan:
    """Forward the request as it came; remember nothing."""

    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    wants_usage: bool = False  # forwarded exactly as the client sent it

    async def record(self, reply: ReplyAccumulator, *, partial: bool) -> None:
        return None


class NoMemory:
    """The memory layer when memory is off: a transparent proxy."""

    async def prepare(self, **_: Any) -> ChatPlan:
        return UnchangedPlan()
