"""The rolling summary: what has left the model's window, told short.

When enough messages have fallen out of the window since the summary last covered
them (`queue_if_due`, from the record path, which knows the window), a `summarize`
job asks the memory model for a new version: the old summary plus those messages,
with speaker names and dates, within a word limit. Long backlogs go in batches of
`summary_batch_tokens`, one version per batch. Each version is kept (the summaries
table is the history); the one it replaces is archived and also stored as a memory of
kind 'summary', so that recall can still find what a later version left out.

Undo: when messages a version covered are undone, that version and every later one
are retracted and the newest earlier one is restored (`rollback`, in the turn's own
transaction); the next `summarize` rebuilds from there. A version is saved only if
the summary it was built on is still the active one and none of its messages was
undone meanwhile; otherwise the job starts over from what is current.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.inject.templates import render
from proxy.memory import jobs, records, scope_state
from proxy.memory.db import Connection
from proxy.memory.facts import date_of
from proxy.memory.llm import CHARS_PER_TOKEN, Target, WontFit, approx_tokens
from proxy.memory.llm_json import Parsed
from proxy.memory.record import EMBED_JOB
from proxy.memory.records import MessageRow, chunked, placeholders
from proxy.memory.scope_state import SummaryRow

if TYPE_CHECKING:
    from proxy.memory.jobs import Job
    from proxy.memory.schedule import JobContext

SUMMARIZE_JOB = "summarize"
FAILED_PAUSE = 600.0  # seconds without a new summarize job after one failed for good
ARCHIVE_IMPORTANCE = 0.6
_MAX_ROUNDS = 50  # batches in one job; the rest waits for the next job
_MIN_BATCH_CHARS = 300  # less room than this for messages: the window is too small

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string"}},
    "required": ["summary"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Batch:
    """The next messages to fold into the summary, and the version they build on."""

    base: SummaryRow | None
    messages: list[MessageRow]
    names: dict[str, str]


# -- queueing and undo (inside record_turn's transaction) --------------------------------


def out_of_window(conn: Connection, scope_id: int, window_seq: int) -> int:
    """Live user/assistant messages before `window_seq` that the summary does not cover
    (private ones never go into a summary: they do not count)."""
    current = scope_state.current_summary(conn, scope_id)
    covered = current.covers_until_seq if current else 0
    return conn.execute(
        "SELECT count(*) FROM messages WHERE scope_id = ? AND state != 'undone'"
        " AND role IN ('user', 'assistant') AND private = 0 AND seq > ? AND seq < ?",
        (scope_id, covered, window_seq),
    ).fetchone()[0]


def queue_if_due(
    conn: Connection,
    scope_id: int,
    window_id: int,
    every: int,
    target: dict[str, Any],
    now: float,
) -> int | None:
    """Queue a `summarize` job when `every` messages have left the window uncovered.

    A job already waiting is moved on to the new window instead; after a job failed
    for good, none is queued for FAILED_PAUSE seconds (a broken model must not cost
    two calls every turn).
    """
    row = conn.execute(
        "SELECT seq FROM messages WHERE id = ? AND scope_id = ?", (window_id, scope_id)
    ).fetchone()
    if row is None or out_of_window(conn, scope_id, row[0]) < max(1, every):
        return None
    until = row[0] - 1
    payload = {"until_seq": until, **target}
    waiting = conn.execute(
        "SELECT id, payload FROM jobs WHERE scope_id = ? AND kind = ? AND state = 'pending'",
        (scope_id, SUMMARIZE_JOB),
    ).fetchone()
    if waiting:
        old = json.loads(waiting[1])
        payload["until_seq"] = max(until, int(old.get("until_seq", 0)))
        conn.execute(
            "UPDATE jobs SET payload = ?, updated_at = ? WHERE id = ?",
            (json.dumps(payload, ensure_ascii=False), now, waiting[0]),
        )
        return None
    failed = conn.execute(
        "SELECT 1 FROM jobs WHERE scope_id = ? AND kind = ? AND state = 'failed'"
        " AND updated_at > ?",
        (scope_id, SUMMARIZE_JOB, now - FAILED_PAUSE),
    ).fetchone()
    if failed:
        return None
    return jobs.enqueue(conn, SUMMARIZE_JOB, payload, scope_id, now)


def _first_seq(conn: Connection, scope_id: int, message_ids: Sequence[int]) -> int:
    """The least seq among the messages (a huge number when none is found)."""
    return min(
        (
            conn.execute(
                f"SELECT min(seq) FROM messages WHERE scope_id = ? AND id IN"
                f" ({placeholders(chunk)})",
                (scope_id, *chunk),
            ).fetchone()[0]
            or 1 << 62
        )
        for chunk in chunked(message_ids)
    )


def shown_while_undoing(
    conn: Connection, scope_id: int, undone: Sequence[int]
) -> tuple[str | None, frozenset[int]]:
    """What a request that takes back `undone` messages may show of the summaries: the
    one `rollback` will leave active once the turn is stored (the newest version that
    covers none of them, or one written by hand), and the archived versions' memories
    that `rollback` will retract (to leave out of the recalled ones). So the reply to an
    edit or a delete is not written from the story it takes back."""
    first = _first_seq(conn, scope_id, undone) if undone else 1 << 62
    row = conn.execute(
        "SELECT text FROM summaries WHERE scope_id = ? AND state IN ('active', 'archived')"
        " AND (covers_until_seq < ? OR json_extract(meta, '$.source') IS 'manual')"
        " ORDER BY state = 'active' DESC, id DESC LIMIT 1",
        (scope_id, first),
    ).fetchone()
    archived = conn.execute(
        "SELECT m.id FROM memories m"
        " JOIN summaries s ON s.id = json_extract(m.meta, '$.summary_id')"
        " WHERE m.scope_id = ? AND m.kind = 'summary' AND m.state = 'active'"
        " AND s.covers_until_seq >= ? AND json_extract(s.meta, '$.source') IS NOT 'manual'",
        (scope_id, first),
    ).fetchall()
    return (row[0] if row else None), frozenset(r[0] for r in archived)


def rollback(conn: Connection, scope_id: int, undone: Sequence[int]) -> list[int]:
    """Retract the summary versions that covered any of the `undone` messages (and
    their archived copies); the newest earlier version becomes active again. A version
    written by hand stays: it is the user's word, not something the messages said.
    Returns the retracted version ids."""
    if not undone:
        return []
    first = _first_seq(conn, scope_id, undone)
    hit = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM summaries WHERE scope_id = ? AND state != 'retracted'"
            " AND covers_until_seq >= ? AND json_extract(meta, '$.source') IS NOT 'manual'",
            (scope_id, first),
        )
    ]
    if not hit:
        return []
    conn.execute(f"UPDATE summaries SET state = 'retracted' WHERE id IN ({placeholders(hit)})", hit)
    _retract_archives(conn, scope_id, hit)
    if scope_state.current_summary(conn, scope_id) is None:
        row = conn.execute(
            "SELECT max(id) FROM summaries WHERE scope_id = ? AND state = 'archived'", (scope_id,)
        ).fetchone()
        if row[0] is not None:
            conn.execute("UPDATE summaries SET state = 'active' WHERE id = ?", (row[0],))
            _retract_archives(conn, scope_id, [row[0]])  # current again: not a memory
    return hit


def _retract_archives(conn: Connection, scope_id: int, summary_ids: list[int]) -> None:
    ids = [
        r[0]
        for r in conn.execute(
            f"SELECT id FROM memories WHERE scope_id = ? AND kind = 'summary' AND state = 'active'"
            f" AND json_extract(meta, '$.summary_id') IN ({placeholders(summary_ids)})",
            (scope_id, *summary_ids),
        )
    ]
    records.retract_memories(conn, scope_id, ids)


# -- the job ----------------------------------------------------------------------------


async def handle_summarize(job: Job, ctx: JobContext) -> None:
    """Fold the messages up to the job's `until_seq` into the summary, batch by batch."""
    from proxy.memory.schedule import job_target, llm_allowed  # circular at import time

    scope_id = job.scope_id
    if scope_id is None or not await ctx.store.read(llm_allowed, scope_id):
        return
    until = int(job.payload.get("until_seq", 0))
    config = ctx.config
    upstream, model = job_target(config, job.payload)
    target = Target(upstream, model)
    max_tokens = int(config.summary_words * 2) + 64
    room = await ctx.model.room(target, max_tokens)
    for _ in range(_MAX_ROUNDS):
        batch = await ctx.store.read(next_batch, scope_id, until, config.summary_batch_tokens * 4)
        if not batch.messages:
            return
        values = {
            **batch.names,
            "words": str(config.summary_words),
            "previous": batch.base.text if batch.base else "(nothing yet: this is the start)",
            "messages": "",
        }
        limit = config.summary_batch_tokens * 4
        if room is not None:  # what the window leaves beside the instructions and old summary
            fixed = render(ctx.prompts.summary_system, values)
            fixed += render(ctx.prompts.summary_user, values)
            limit = min(limit, (room - approx_tokens(fixed)) * CHARS_PER_TOKEN)
            if limit < _MIN_BATCH_CHARS:
                raise WontFit(
                    f"the context window of {upstream!r} leaves {room} tokens for a summary "
                    f"prompt: too few for the instructions, the summary so far and new "
                    f"messages (lower [background] summary_words or use a larger window)"
                )
        messages = _fit(batch.messages, limit)
        values["messages"] = "\n".join(_line(m, limit - 60) for m in messages)
        text = await ctx.model.ask(
            target,
            [
                {"role": "system", "content": render(ctx.prompts.summary_system, values)},
                {"role": "user", "content": render(ctx.prompts.summary_user, values)},
            ],
            name="summary",
            schema=SCHEMA,
            max_tokens=max_tokens,
            check=read_summary,
        )
        meta = {"after_seq": batch.base.covers_until_seq if batch.base else 0}
        meta.update({"messages": len(messages), "upstream": upstream, "model": model})
        archived = await ctx.store.write(
            save_version, scope_id, batch.base, text, messages, meta, ctx.clock()
        )
        if archived:
            ctx.wake()


def _fit(messages: list[MessageRow], limit: int) -> list[MessageRow]:
    """The first messages whose lines fit in `limit` characters (at least one)."""
    used = 0
    for count, m in enumerate(messages):
        used += len(m.content) + 40
        if count and used > limit:
            return messages[:count]
    return messages


def next_batch(conn: Connection, scope_id: int, until_seq: int, max_chars: int) -> Batch:
    """The summary now, and the uncovered live messages up to `until_seq` that fit in
    `max_chars` (at least one; the prompt cuts one that alone is longer). Private
    messages (`X-Memory-Write: off`) are never summarized."""
    base = scope_state.current_summary(conn, scope_id)
    after = base.covers_until_seq if base else 0
    rows = [
        m
        for m in records.get_messages(conn, scope_id, after_seq=after, until_seq=until_seq)
        if m.role in ("user", "assistant") and not m.private and m.content.strip()
    ]
    batch: list[MessageRow] = []
    used = 0
    for m in rows:
        size = len(m.content) + 40
        if batch and used + size > max_chars:
            break
        batch.append(m)
        used += size
    names = {"char": "the character", "user": "the user"}
    for m in rows or batch:
        if m.speaker:
            names["char" if m.role == "assistant" else "user"] = m.speaker
    return Batch(base, batch, names)


def read_summary(parsed: Parsed) -> str:
    """The summary text of the model's answer; ValueError when there is none. A summary
    cut off at max_tokens is trimmed back to its last whole sentence."""
    value = parsed.value
    text: Any = None
    if isinstance(value, dict):
        text = value.get("summary")
        if not isinstance(text, str):
            strings = [v for v in value.values() if isinstance(v, str) and v.strip()]
            text = strings[0] if len(strings) == 1 else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the answer has no 'summary' text")
    text = text.strip()
    if parsed.truncated:
        ends = [m.end() for m in re.finditer(r"[.!?…][\"”’')\]]*(\s|$)", text)]
        if not ends:
            raise ValueError("the summary was cut off before its first sentence ended")
        text = text[: ends[-1]].strip()
    return text


def save_version(
    conn: Connection,
    scope_id: int,
    base: SummaryRow | None,
    text: str,
    messages: list[MessageRow],
    meta: dict[str, Any],
    now: float,
) -> int | None:
    """Save a new version built on `base` from `messages`, archiving `base` as a
    memory. Nothing is saved (None) if `base` is no longer the active version or a
    message was undone meanwhile. Returns the archive memory id, if one was made."""
    current = scope_state.current_summary(conn, scope_id)
    if (current.id if current else None) != (base.id if base else None):
        return None
    ids = [m.id for m in messages]
    undone = conn.execute(
        f"SELECT count(*) FROM messages WHERE state = 'undone' AND id IN ({placeholders(ids)})",
        ids,
    ).fetchone()[0]
    if undone:
        return None
    covers = max(m.seq for m in messages)
    scope_state.save_summary(conn, scope_id, text, covers, now, meta)
    if base is None:
        return None
    return _archive(conn, scope_id, base, now)


def _archive(conn: Connection, scope_id: int, version: SummaryRow, now: float) -> int:
    """Store a replaced version as a 'summary' memory, dated by its last message and
    linked to the messages it added (undoing them all retracts it)."""
    after = int(version.meta.get("after_seq", version.covers_until_seq))
    rows = conn.execute(
        "SELECT id, seen_at FROM messages WHERE scope_id = ? AND state != 'undone'"
        " AND role IN ('user', 'assistant') AND private = 0 AND seq > ? AND seq <= ?"
        " ORDER BY seq",
        (scope_id, after, version.covers_until_seq),
    ).fetchall()
    at = rows[-1][1] if rows else version.created_at
    [memory_id] = records.insert_memories(
        conn,
        [
            records.NewMemory(
                scope_id=scope_id,
                kind="summary",
                text=version.text,
                at=at,
                importance=ARCHIVE_IMPORTANCE,
                sources=[r[0] for r in rows],
                meta={"summary_id": version.id, "covers_until_seq": version.covers_until_seq},
            )
        ],
        now,
    )
    jobs.enqueue(conn, EMBED_JOB, {"memory_ids": [memory_id]}, scope_id, now)
    return memory_id


def _line(message: MessageRow, limit: int) -> str:
    speaker = message.speaker or message.role
    text = " ".join(message.content.split())
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"{date_of(message.seen_at)} {speaker}: {text}"
