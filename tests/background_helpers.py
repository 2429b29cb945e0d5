"""Helpers for tests of background LLM work: a scripted memory model on the fake
upstream, a proxy with it turned on, and looks into the store."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from proxy.memory import jobs, records
from proxy.memory.store import Store
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import st_body, wait_until

Script = Callable[[dict[str, Any]], Any]  # request body -> dict (as JSON), str or Reply


def job_kind(body: dict[str, Any]) -> str | None:
    """Which background job sent this request ('facts', 'summary', 'insights'), by the
    structured-output schema it asks for, else by its instructions; None: a user's."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
        return rf["json_schema"].get("name")
    system = str(body["messages"][0].get("content", ""))
    for kind, marker in (
        ("summary", "running summary"),
        ("facts", "pick out facts"),
        ("insights", "bigger picture"),
    ):
        if marker in system:
            return kind
    return None


def last_user_request(up: FakeUpstream) -> dict[str, Any]:
    """The body of the last chat request that was a user's, not a background job's."""
    return next(r.json for r in reversed(up.chat_requests) if job_kind(r.json) is None)


def prompt_of(body: dict[str, Any]) -> str:
    """Every message of a request, joined."""
    return "\n".join(str(m.get("content", "")) for m in body["messages"])


@dataclass
class MemoryModel:
    """The fake upstream's responder: users get `chat(body)`, background jobs get what
    `facts` / `summary` / `insights` return (dicts are sent as JSON). Every background
    request is kept in `calls`, by kind."""

    chat: Callable[[dict[str, Any]], str] = lambda body: "Mira nods."
    facts: Script = lambda body: {"facts": []}
    summary: Script = lambda body: {"summary": "Nothing happened yet."}
    insights: Script = lambda body: {"insights": []}
    calls: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, body: dict[str, Any]) -> Reply:
        kind = job_kind(body)
        if kind is None:
            return Reply(self.chat(body))
        with self._lock:
            self.calls.setdefault(kind, []).append(body)
        out = getattr(self, kind)(body)
        if isinstance(out, Reply):
            return out
        return Reply(out if isinstance(out, str) else json.dumps(out))

    def count(self, kind: str) -> int:
        """Background requests of `kind` so far."""
        with self._lock:
            return len(self.calls.get(kind, []))


def background_proxy(
    make_proxy: MakeProxy,
    up: FakeUpstream,
    tmp_path: Path,
    *,
    background: dict[str, Any] | None = None,
    **sections: Any,
) -> RunningServer:
    """The proxy with memory and background LLM work on, embeddings from the fake."""
    sections.setdefault(
        "embeddings", {"backend": "upstream", "upstream": "local", "model": "fake-model"}
    )
    memory = {"enabled": True, "database": str(tmp_path / "memory.db")}
    memory.update(sections.pop("memory", {}))
    settings = {"llm": True, "backoff_seconds": 0.05, **(background or {})}
    return make_proxy({"local": up}, memory=memory, background=settings, **sections)


def say(
    proxy: RunningServer,
    history: list[tuple[str, str]],
    text: str,
    reply: str | None = None,
    *,
    scope: str = "chat",
    now: str | None = None,
    up: FakeUpstream | None = None,
) -> list[tuple[str, str]]:
    """One SillyTavern turn (the whole history resent); returns the history after it.
    The reply is the model's (`reply` is only what the history records if given)."""
    history = [*history, ("user", text)]
    headers = {"x-memory-scope": scope}
    if now is not None:
        headers["x-memory-now"] = now
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", json=st_body(history), headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    return [*history, ("assistant", reply if reply is not None else answer)]


def read(db: Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a read function on the proxy's database (opened on the side, as the CLI does)."""
    store = Store.open_sync(db)
    try:
        return store.read_sync(fn, *args, **kwargs)
    finally:
        store.close_sync()


def write(db: Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a write function on the proxy's database."""
    store = Store.open_sync(db)
    try:
        return store.write_sync(fn, *args, **kwargs)
    finally:
        store.close_sync()


def scope_id(db: Path, name: str = "chat") -> int:
    """The id of a scope of the keyless owner."""
    scope = read(db, records.get_scope, "", name)
    assert scope is not None, f"no scope {name!r}"
    return scope.id


def all_jobs(db: Path) -> list[jobs.Job]:
    """Every job, oldest first."""
    return list(reversed(read(db, jobs.list_jobs, limit=10_000)))


def wait_for_jobs(db: Path, timeout: float = 15.0) -> list[jobs.Job]:
    """Wait until no job is pending or running (retries due later count as pending)."""
    wait_until(
        lambda: not any(j.state in ("pending", "running") for j in all_jobs(db)),
        timeout,
        "the background jobs to finish",
    )
    return all_jobs(db)


def memories(db: Path, scope: int, kind: str, states: tuple[str, ...] = ("active",)) -> list[Any]:
    """A scope's memories of one kind, oldest first."""
    found = read(db, records.list_memories, scope, kinds=[kind], states=states, limit=1000)
    return list(reversed(found))
