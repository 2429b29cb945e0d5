"""Which background LLM jobs a stored turn queues, and the knobs they run with.

`after_turn` runs inside `record_turn`'s write transaction, so a turn and the jobs it
calls for are stored together (a crash loses neither). It queues

- `extract` after each exchange: facts from the new messages;
- `summarize` when enough messages have left the model's window since the rolling
  summary last covered them;

and keeps what an undo touched consistent: summary versions that covered undone
messages are rolled back (the next `summarize` rebuilds from the last good one), and
facts that a retracted fact had superseded come back. `reflect` is queued by the
`extract` job itself, when the importance of new facts adds up.

Jobs carry the upstream and model of the request that caused them: by default the
memory model is the conversation's own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.memory import facts, summary
from proxy.memory.db import Connection
from proxy.memory.prompts import DEFAULT_PROMPTS, Prompts

if TYPE_CHECKING:
    from proxy.memory.embed import Embedder
    from proxy.memory.llm import MemoryModel
    from proxy.memory.store import Store
    from proxy.memory.transcript import Alignment


@dataclass(frozen=True)
class BackgroundConfig:
    """The knobs of background LLM work (from `[background]`)."""

    enabled: bool = True
    upstream: str = ""  # "" = the conversation's own
    model: str = ""  # "" = the conversation's own
    summary: bool = True
    summary_every: int = 8
    summary_words: int = 250
    summary_batch_tokens: int = 2000
    facts: bool = True
    known_facts: int = 8
    context_messages: int = 4
    reflection: bool = True
    reflect_threshold: float = 5.0
    reflect_insights: int = 3
    reflect_facts: int = 30
    max_attempts: int = 5
    backoff_seconds: float = 30.0
    max_tokens: int = 600  # per answer of facts and reflection (the summary's follows its words)


@dataclass(frozen=True)
class TurnJobs:
    """What the chat route knows that background jobs need (carried on `Turn.jobs`)."""

    config: BackgroundConfig
    upstream: str
    model: str | None
    # Request index of the first conversation message the upstream saw after trimming;
    # every stored message before it has left the window. None: unknown.
    window_start: int | None = None

    def queue(
        self,
        conn: Connection,
        scope_id: int,
        alignment: Alignment,
        new_ids: Sequence[int],
        retracted: Sequence[int],
    ) -> list[int]:
        """`after_turn` for a turn that `record_turn` just stored (in its transaction)."""
        window_id = window_message_id(self.window_start, alignment.matched, alignment.new, new_ids)
        return after_turn(
            conn,
            scope_id,
            self,
            new_ids=new_ids,
            window_id=window_id,
            undone=alignment.undone,
            retracted=retracted,
            now=time.time(),
        )


@dataclass
class JobContext:
    """What a job handler works with (built once by the worker)."""

    store: Store
    model: MemoryModel
    config: BackgroundConfig
    prompts: Prompts = DEFAULT_PROMPTS
    embedder: Embedder | None = None  # set once the embedding model is ready
    clock: Callable[[], float] = time.time
    wake: Callable[[], None] = field(default=lambda: None)  # new embed jobs were queued


def job_target(config: BackgroundConfig, payload: dict[str, Any]) -> tuple[str, str | None]:
    """The upstream and model a job uses: the configured memory model, else the
    conversation's own (recorded on the job)."""
    upstream = config.upstream or str(payload.get("upstream") or "")
    model = config.model or payload.get("model") or None
    if config.upstream and not config.model:
        model = None  # another server: the conversation's model name means nothing there
    return upstream, model


def llm_allowed(conn: Connection, scope_id: int) -> bool:
    """Per-scope switch: scope settings `{"llm": false}` turn background LLM work off."""
    row = conn.execute("SELECT settings FROM scopes WHERE id = ?", (scope_id,)).fetchone()
    if row is None:
        return False
    try:
        settings = json.loads(row[0])
    except ValueError:
        return True
    return not (isinstance(settings, dict) and settings.get("llm") is False)


def after_turn(
    conn: Connection,
    scope_id: int,
    turn: TurnJobs,
    *,
    new_ids: Sequence[int],
    window_id: int | None,
    undone: Sequence[int],
    retracted: Sequence[int],
    now: float,
) -> list[int]:
    """Queue the jobs a stored turn calls for; return their ids (see the module docstring).

    `new_ids`: the messages this turn appended; `window_id`: the stored id of the first
    message the upstream saw; `undone` / `retracted`: what the turn's undo touched.
    """
    queued: list[int] = []
    if retracted:
        queued += facts.restore_superseded(conn, scope_id, retracted, now)
    if undone:
        summary.rollback(conn, scope_id, undone)
    config = turn.config
    if not config.enabled or not llm_allowed(conn, scope_id):
        return queued
    target = {"upstream": turn.upstream, "model": turn.model}
    if config.facts and new_ids:
        queued += facts.queue_extract(conn, scope_id, new_ids, target, now)
    if config.summary and window_id is not None:
        job = summary.queue_if_due(conn, scope_id, window_id, config.summary_every, target, now)
        if job is not None:
            queued.append(job)
    return queued


def window_message_id(
    window_start: int | None,
    matched: Sequence[tuple[int, int]],
    new: Sequence[int],
    new_ids: Sequence[int],
) -> int | None:
    """The stored id of request message `window_start`, matched or just appended."""
    if window_start is None:
        return None
    for index, stored_id in matched:
        if index == window_start:
            return stored_id
    for index, stored_id in zip(new, new_ids, strict=False):
        if index == window_start:
            return stored_id
    return None


def first_in_window(
    messages: Sequence[dict[str, Any]], kept: Sequence[int], dropped: Sequence[int]
) -> int | None:
    """The request index of the first conversation message the upstream sees after
    trimming (the oldest one after everything trimmed): what precedes it has left the
    model's window."""
    conversation = ("user", "assistant")
    last_dropped = max((i for i in dropped if messages[i].get("role") in conversation), default=-1)
    return min(
        (i for i in kept if i > last_dropped and messages[i].get("role") in conversation),
        default=None,
    )
