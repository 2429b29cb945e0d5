"""Facts: short, self-contained statements the memory model draws from each exchange.

The `extract` job shows the model the new messages (numbered), a few earlier ones for
context, and the known facts most related to them (labelled K1, K2...: found by
vector and keyword search in the scope, plus the newest). The model answers with
facts, each with an importance (0-1), the numbers of the messages it comes from, and
whether it repeats (`same_as`) or changes (`updates`) a known fact. Then, in one
transaction:

- a repeat is merged into the known fact (its new sources are linked, its importance
  is the higher of the two): never stored twice;
- a change is stored and supersedes the known fact, which is kept, marked
  superseded, with the date it stopped being true (`meta.superseded_at`);
- anything else is stored as a new fact, dated by its latest source message and
  linked to its source messages (so that undoing them retracts it);
- new facts are queued for embedding, and a `reflect` job when their importance adds
  up (`proxy.memory.reflect`).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from proxy.inject.templates import render
from proxy.memory import jobs, records, reflect, vectors
from proxy.memory.db import Connection
from proxy.memory.llm import CHARS_PER_TOKEN, Target, WontFit, approx_tokens
from proxy.memory.llm_json import Parsed, normalise, read_importance
from proxy.memory.prompts import Prompts
from proxy.memory.record import EMBED_JOB
from proxy.memory.records import MessageRow, chunked, placeholders

if TYPE_CHECKING:
    from proxy.memory.jobs import Job
    from proxy.memory.schedule import JobContext

EXTRACT_JOB = "extract"
_CONTEXT_CHARS = 600  # of each earlier message shown for context
_MESSAGE_CHARS = 3000  # of each new message
_MIN_MESSAGE_CHARS = 80  # less room than this per new message: the window is too small
_QUERY_CHARS = 2000  # of the new messages, as the search for related facts
_MIN_SIMILARITY = 0.3
MAX_BATCH_MESSAGES = 12  # new messages in one extraction: a job's, or jobs taken along

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "facts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "importance": {"type": "number"},
                    "from": {"type": "array", "items": {"type": "integer"}},
                    "same_as": {"type": ["string", "null"]},
                    "updates": {"type": ["string", "null"]},
                },
                "required": ["text", "importance", "from", "same_as", "updates"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["facts"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Known:
    """A known fact shown to the model under a label."""

    id: int
    text: str
    at: float


@dataclass(frozen=True)
class NewFact:
    """A fact as the model gave it, checked."""

    text: str
    importance: float
    sources: tuple[int, ...]  # message ids
    same_as: int | None  # a known fact's memory id
    updates: int | None


@dataclass(frozen=True)
class ExtractInput:
    """What an extract job reads before asking the model."""

    new: list[MessageRow]
    context: list[MessageRow]


# -- queueing (inside record_turn's transaction) -------------------------------------


def queue_extract(
    conn: Connection,
    scope_id: int,
    message_ids: Sequence[int],
    target: dict[str, Any],
    now: float,
) -> list[int]:
    """Queue fact extraction from the user and assistant messages among `message_ids`,
    at most MAX_BATCH_MESSAGES a job (an edit far back re-appends the whole rest of the
    chat: one prompt would squeeze each message into a sliver of the window)."""
    ids = [
        row.id
        for row in records.get_messages(conn, scope_id, ids=message_ids)
        if row.role in ("user", "assistant") and not row.private and row.content.strip()
    ]
    return [
        jobs.enqueue(conn, EXTRACT_JOB, {"message_ids": batch, **target}, scope_id, now)
        for batch in (
            ids[i : i + MAX_BATCH_MESSAGES] for i in range(0, len(ids), MAX_BATCH_MESSAGES)
        )
    ]


def restore_superseded(
    conn: Connection, scope_id: int, retracted: Sequence[int], now: float
) -> list[int]:
    """Facts superseded by a fact that was just retracted (its messages were undone)
    become active again, if a source of theirs is still live; return the embed job."""
    restored: list[int] = []
    for chunk in chunked(retracted):
        rows = conn.execute(
            f"SELECT m.id FROM memories m WHERE m.scope_id = ? AND m.state = 'superseded'"
            f" AND m.superseded_by IN ({placeholders(chunk)}) AND EXISTS"
            " (SELECT 1 FROM memory_sources s JOIN messages g ON g.id = s.message_id"
            "  WHERE s.memory_id = m.id AND g.state != 'undone')",
            (scope_id, *chunk),
        ).fetchall()
        restored += [r[0] for r in rows]
    if not restored:
        return []
    for chunk in chunked(restored):
        # Back to active: the trigger drops the old vector; it is embedded again.
        conn.execute(
            f"UPDATE memories SET state = 'active', superseded_by = NULL,"
            f" meta = json_remove(meta, '$.superseded_at') WHERE id IN ({placeholders(chunk)})",
            chunk,
        )
    return [jobs.enqueue(conn, EMBED_JOB, {"memory_ids": restored}, scope_id, now)]


# -- the job --------------------------------------------------------------------------


async def handle_extract(job: Job, ctx: JobContext) -> None:
    """Extract facts from the job's messages and store them (see the module docstring).

    Extract jobs of the same scope that queued up behind this one (the user chatted
    on while the model was busy) are taken along: one request for all their messages.
    If this job does not finish, they go back to the queue as they were.
    """
    from proxy.memory.schedule import llm_allowed  # circular at import time

    scope_id = job.scope_id
    if scope_id is None or not await ctx.store.read(llm_allowed, scope_id):
        return
    ids = [int(i) for i in job.payload.get("message_ids", ())]
    more = await ctx.store.write(_claim_more, job, len(ids), ctx.clock())
    try:
        await _extract(job, [job.id, *more], ids + [i for m in more.values() for i in m], ctx)
    except WontFit:
        if not more:
            raise
        # Too much for the model's window together: this job alone, the rest later.
        await ctx.store.write(_give_back, list(more), ctx.clock())
        await _extract(job, [job.id], ids, ctx)
    except BaseException:
        if more:
            await ctx.store.write(_give_back, list(more), ctx.clock())
        raise


async def _extract(job: Job, job_ids: list[int], ids: list[int], ctx: JobContext) -> None:
    from proxy.memory.schedule import job_target  # circular at import time

    scope_id = job.scope_id
    assert scope_id is not None
    found = await ctx.store.read(_load_input, scope_id, ids, ctx.config.context_messages)
    if not found.new:
        await ctx.store.write(_finish_all, job_ids, ctx.clock())
        return  # undone before the job ran
    query = " ".join(m.content for m in found.new)[:_QUERY_CHARS]
    vector = None
    if ctx.embedder is not None and ctx.embedder.ready:
        vector = (await ctx.embedder.embed([query]))[0]
    known = await ctx.store.read(_related_facts, scope_id, vector, query, ctx.config.known_facts)
    char, user = _names(found.context + found.new)
    values = {
        "char": char,
        "user": user,
        "known": "\n".join(f"K{i}. {k.text}" for i, k in enumerate(known, 1)) or "(none)",
        "context": "\n".join(_line(m, None, _CONTEXT_CHARS) for m in found.context) or "(none)",
        "messages": "",
    }
    prompts = ctx.prompts
    upstream, model = job_target(ctx.config, job.payload)
    target = Target(upstream, model)
    limit = _MESSAGE_CHARS
    room = await ctx.model.room(target, ctx.config.max_tokens)
    if room is not None:  # cut long messages to what the window leaves
        share = _share(prompts, values, room, len(found.new))
        if share < _MIN_MESSAGE_CHARS and found.context:  # context is a nicety: drop it
            values["context"] = "(none)"
            share = _share(prompts, values, room, len(found.new))
        if share < _MIN_MESSAGE_CHARS:
            raise WontFit(
                f"the context window of {upstream!r} leaves {room} tokens for a fact "
                f"prompt: too few for {len(found.new)} messages (use a larger window)"
            )
        limit = min(limit, share)
    values["messages"] = "\n".join(_line(m, i, limit) for i, m in enumerate(found.new, 1))
    new_facts = await ctx.model.ask(
        target,
        [
            {"role": "system", "content": render(prompts.facts_system, values)},
            {"role": "user", "content": render(prompts.facts_user, values)},
        ],
        name="facts",
        schema=SCHEMA,
        max_tokens=ctx.config.max_tokens,
        check=lambda parsed: read_facts(parsed, [m.id for m in found.new], [k.id for k in known]),
    )
    reflect_target = {"upstream": job.payload.get("upstream"), "model": job.payload.get("model")}
    threshold = ctx.config.reflect_threshold if ctx.config.reflection else None
    added = await ctx.store.write(
        store_facts, scope_id, job_ids, new_facts, threshold, reflect_target, ctx.clock()
    )
    if added:
        ctx.wake()


def _share(prompts: Prompts, values: dict[str, str], room: int, count: int) -> int:
    """Characters each of `count` new messages may take in a prompt of `room` tokens."""
    fixed = render(prompts.facts_system, values) + render(prompts.facts_user, values)
    return (room - approx_tokens(fixed)) * CHARS_PER_TOKEN // count - 30


def _claim_more(conn: Connection, job: Job, have: int, now: float) -> dict[int, list[int]]:
    """Take the scope's other due extract jobs for the same model along (marked running),
    while the messages stay under MAX_BATCH_MESSAGES. Returns {job id: message ids}."""
    taken: dict[int, list[int]] = {}
    rows = conn.execute(
        "SELECT id, payload FROM jobs WHERE scope_id = ? AND kind = ? AND state = 'pending'"
        " AND run_after <= ? AND id != ? ORDER BY id LIMIT 50",
        (job.scope_id, EXTRACT_JOB, now, job.id),
    ).fetchall()
    for job_id, raw in rows:
        payload = json.loads(raw)
        same = all(payload.get(k) == job.payload.get(k) for k in ("upstream", "model"))
        ids = [int(i) for i in payload.get("message_ids", ())]
        if not same or have + len(ids) > MAX_BATCH_MESSAGES:
            break
        taken[job_id] = ids
        have += len(ids)
    if taken:
        conn.execute(
            f"UPDATE jobs SET state = 'running', updated_at = ?"
            f" WHERE id IN ({placeholders(list(taken))})",
            (now, *taken),
        )
    return taken


def _give_back(conn: Connection, job_ids: list[int], now: float) -> None:
    """Jobs taken along by one that did not finish: pending again, no attempt counted."""
    for job_id in job_ids:
        conn.execute(
            "UPDATE jobs SET state = 'pending', updated_at = ? WHERE id = ? AND state = 'running'",
            (now, job_id),
        )


def _finish_all(conn: Connection, job_ids: list[int], now: float) -> None:
    for job_id in job_ids:
        jobs.finish(conn, job_id, now)


def _load_input(conn: Connection, scope_id: int, ids: list[int], context: int) -> ExtractInput:
    new = [
        m
        for m in records.get_messages(conn, scope_id, ids=ids)
        if m.role in ("user", "assistant") and not m.private and m.content.strip()
    ]
    if not new or context <= 0:
        return ExtractInput(new, [])
    before = conn.execute(
        "SELECT id FROM messages WHERE scope_id = ? AND state != 'undone' AND seq < ?"
        " AND role IN ('user', 'assistant') AND private = 0 ORDER BY seq DESC LIMIT ?",
        (scope_id, new[0].seq, context),
    ).fetchall()
    return ExtractInput(new, records.get_messages(conn, scope_id, ids=[r[0] for r in before]))


def _related_facts(
    conn: Connection, scope_id: int, vector: np.ndarray | None, query: str, limit: int
) -> list[Known]:
    """The active facts of the scope most related to `query`: nearest by vector, best
    by keyword, and the newest, interleaved, at most `limit`."""
    if limit <= 0:
        return []
    by_vector = _nearest_facts(conn, scope_id, vector, limit) if vector is not None else []
    hits = vectors.keyword_search(conn, scope_id, query, 4 * limit + 20)
    by_keyword = _active_facts(conn, scope_id, [h.memory_id for h in hits])
    newest = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM memories WHERE scope_id = ? AND kind = 'fact' AND state = 'active'"
            " ORDER BY id DESC LIMIT 3",
            (scope_id,),
        )
    ]
    order: list[int] = []
    for group in zip(_padded(by_vector, limit), _padded(by_keyword, limit), strict=True):
        order += [i for i in group if i is not None and i not in order]
    order += [i for i in newest if i not in order]
    chosen = order[:limit]
    rows = {m.id: m for m in records.load_candidates(conn, scope_id, chosen)}
    return [Known(i, rows[i].text, rows[i].at) for i in chosen if i in rows]


def _padded(ids: list[int], n: int) -> list[int | None]:
    return [*ids[:n], *([None] * (n - len(ids[:n])))]


def _active_facts(conn: Connection, scope_id: int, ids: list[int]) -> list[int]:
    """Those of `ids` that are active facts of the scope, in the order given."""
    found: set[int] = set()
    for chunk in chunked(ids):
        found |= {
            r[0]
            for r in conn.execute(
                f"SELECT id FROM memories WHERE scope_id = ? AND kind = 'fact'"
                f" AND state = 'active' AND id IN ({placeholders(chunk)})",
                (scope_id, *chunk),
            )
        }
    return [i for i in ids if i in found]


def _nearest_facts(conn: Connection, scope_id: int, vector: np.ndarray, k: int) -> list[int]:
    """Exact cosine over the scope's embedded active facts (a scope has far fewer facts
    than turns, so a scan of them is cheap, and a KNN over all memories would let turns
    crowd the facts out)."""
    rows = conn.execute(
        "SELECT m.id, e.vector FROM memories m JOIN embeddings e ON e.memory_id = m.id"
        " WHERE m.scope_id = ? AND m.kind = 'fact' AND m.state = 'active'"
        " ORDER BY m.id DESC LIMIT 20000",
        (scope_id,),
    ).fetchall()
    if not rows:
        return []
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    width = len(rows[0][1]) // 4
    if query.shape[0] > width:
        return []  # another model's vectors: the worker re-embeds them
    padded = np.zeros(width, dtype=np.float32)
    padded[: query.shape[0]] = query / max(float(np.linalg.norm(query)), 1e-12)
    matrix = np.frombuffer(b"".join(r[1] for r in rows if len(r[1]) == width * 4), "<f4")
    ids = [r[0] for r in rows if len(r[1]) == width * 4]
    sims = matrix.reshape(len(ids), width) @ padded
    best = np.argsort(-sims)[:k]
    return [ids[i] for i in best if sims[i] >= _MIN_SIMILARITY]


# -- reading the answer ------------------------------------------------------------------


def read_facts(parsed: Parsed, message_ids: list[int], known_ids: list[int]) -> list[NewFact]:
    """The facts of the model's answer; ValueError when it has none in a usable shape.

    Lenient: a bare list, a string per fact, importance as 1-10 or words, message
    numbers as strings, labels as "K2", "k2", 2 or a list of them.
    """
    items = _fact_items(parsed.value)
    if parsed.truncated and items:
        items = items[:-1]  # the reader keeps whole elements only; still, the last may be cut
    out: list[NewFact] = []
    for item in items:
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            continue
        text = item.get("text") or item.get("fact") or item.get("content")
        if not isinstance(text, str) or not text.strip():
            continue
        out.append(
            NewFact(
                text=" ".join(text.split()),
                importance=read_importance(item.get("importance")),
                sources=_sources(item.get("from", item.get("sources")), message_ids),
                same_as=_label(item.get("same_as"), known_ids),
                updates=_label(item.get("updates", item.get("replaces")), known_ids),
            )
        )
    if items and not out:
        raise ValueError("none of the facts has a 'text'")
    return out


def _fact_items(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        facts = value.get("facts")
        if isinstance(facts, list):
            return facts
        if isinstance(value.get("text"), str):
            return [value]  # one fact, unwrapped
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise ValueError("the answer has no 'facts' list")


def _sources(value: Any, message_ids: list[int]) -> tuple[int, ...]:
    """Message numbers (1-based) to ids; all the new messages when none is usable."""
    numbers = value if isinstance(value, list) else [value]
    picked: list[int] = []
    for n in numbers:
        digits = re.sub(r"\D", "", str(n)) if n is not None else ""
        if digits and 1 <= int(digits) <= len(message_ids):
            picked.append(message_ids[int(digits) - 1])
    return tuple(dict.fromkeys(picked)) or tuple(message_ids)


def _label(value: Any, known_ids: list[int]) -> int | None:
    """A known fact's label ("K2", 2, ["K2"]) to its memory id; None when there is none."""
    if isinstance(value, list):
        value = next((v for v in value if v not in (None, "")), None)
    if value is None or isinstance(value, bool):
        return None
    digits = re.sub(r"\D", "", str(value))
    if digits and 1 <= int(digits) <= len(known_ids):
        return known_ids[int(digits) - 1]
    return None


# -- storing ----------------------------------------------------------------------------


def store_facts(
    conn: Connection,
    scope_id: int,
    job_ids: list[int],
    new_facts: list[NewFact],
    reflect_threshold: float | None,
    target: dict[str, Any],
    now: float,
) -> list[int]:
    """Merge, supersede or insert each fact; queue embedding (and reflection); finish
    the jobs. Returns the new fact ids."""
    added: list[int] = []
    keys: dict[str, int] = {}  # normalised text -> fact id, within this answer
    for fact in new_facts:
        live = _live_sources(conn, scope_id, fact.sources)
        if not live:
            continue  # its messages were undone while the model thought
        key = normalise(fact.text)
        twin = keys.get(key) or fact.same_as or _same_text(conn, scope_id, key, fact.updates)
        if twin is not None and _merge(conn, scope_id, twin, live, fact.importance, now):
            continue
        at = conn.execute(
            f"SELECT max(seen_at) FROM messages WHERE id IN ({placeholders(live)})", live
        ).fetchone()[0]
        [fact_id] = records.insert_memories(
            conn,
            [
                records.NewMemory(
                    scope_id=scope_id,
                    kind="fact",
                    text=fact.text,
                    at=at,
                    importance=fact.importance,
                    sources=live,
                    meta={"job": job_ids[0]},
                )
            ],
            now,
        )
        if fact.updates is not None and records.supersede_memory(
            conn, scope_id, fact.updates, fact_id
        ):
            conn.execute(
                "UPDATE memories SET meta = json_set(meta, '$.superseded_at', ?) WHERE id = ?",
                (at, fact.updates),
            )
        keys[key] = fact_id
        added.append(fact_id)
    if added:
        jobs.enqueue(conn, EMBED_JOB, {"memory_ids": added}, scope_id, now)
    if reflect_threshold is not None:
        reflect.queue_if_due(conn, scope_id, reflect_threshold, target, now)
    _finish_all(conn, job_ids, now)
    return added


def _live_sources(conn: Connection, scope_id: int, ids: Sequence[int]) -> list[int]:
    if not ids:
        return []
    return [
        r[0]
        for r in conn.execute(
            f"SELECT id FROM messages WHERE scope_id = ? AND state != 'undone'"
            f" AND id IN ({placeholders(list(ids))}) ORDER BY seq",
            (scope_id, *ids),
        )
    ]


def _same_text(conn: Connection, scope_id: int, key: str, updates: int | None) -> int | None:
    """An active fact of the scope with the same words (the model missed the repeat);
    not the one this fact updates."""
    words = vectors.query_words(key)
    if not words:
        return None
    expression = " ".join(f'"{w}"' for w in words)  # every word (\w+ has no quotes)
    lo, hi = scope_id << vectors.SCOPE_SHIFT, (scope_id + 1) << vectors.SCOPE_SHIFT
    rows = conn.execute(
        "SELECT m.id, m.text FROM memories_fts f JOIN memories m ON m.id = f.rowid - ?"
        " WHERE memories_fts MATCH ? AND f.rowid >= ? AND f.rowid < ?"
        " AND m.kind = 'fact' AND m.state = 'active' LIMIT 50",
        (lo, expression, lo, hi),
    ).fetchall()
    for memory_id, text in rows:
        if memory_id != updates and normalise(text) == key:
            return memory_id
    return None


def _merge(
    conn: Connection, scope_id: int, fact_id: int, sources: list[int], importance: float, at: float
) -> bool:
    """Fold a repeat into an active fact: link its sources, keep the higher importance."""
    row = conn.execute(
        "SELECT importance, meta FROM memories WHERE id = ? AND scope_id = ? AND state = 'active'"
        " AND kind = 'fact'",
        (fact_id, scope_id),
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        f"INSERT OR IGNORE INTO memory_sources (memory_id, message_id) SELECT ?, id"
        f" FROM messages WHERE scope_id = ? AND id IN ({placeholders(sources)})",
        (fact_id, scope_id, *sources),
    )
    meta = json.loads(row[1])
    meta["repeats"] = int(meta.get("repeats", 0)) + 1
    conn.execute(
        "UPDATE memories SET importance = max(importance, ?), meta = ? WHERE id = ?",
        (importance, json.dumps(meta, ensure_ascii=False), fact_id),
    )
    return True


# -- prompt pieces ----------------------------------------------------------------------


def date_of(seconds: float) -> str:
    """A message date as the prompts write it (UTC, like the memory block)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


def _line(message: MessageRow, number: int | None, limit: int) -> str:
    speaker = message.speaker or message.role
    text = " ".join(message.content.split())
    if len(text) > limit:
        text = text[:limit] + "…"
    head = f"[{number}] " if number is not None else ""
    return f"{head}{date_of(message.seen_at)} {speaker}: {text}"


def _names(messages: Sequence[MessageRow]) -> tuple[str, str]:
    """The character's and the user's names, from who spoke (latest wins)."""
    char, user = "the character", "the user"
    for m in messages:
        if m.speaker and m.role == "assistant":
            char = m.speaker
        elif m.speaker and m.role == "user":
            user = m.speaker
    return char, user
