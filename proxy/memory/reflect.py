"""Reflection: a few higher-level insights drawn from the facts gathered since the last one.

When the importance of the scope's not-yet-reflected facts adds up past a threshold
(`queue_if_due`, called by the extract job), a `reflect` job shows the model those
facts (labelled F1, F2...) and the insights it already has, and asks for at most a
few new ones, each citing the facts it rests on. An insight is stored as a memory of
kind 'insight', linked to the source messages of its facts (so that it is retracted
when all of them are undone) with the fact ids in `meta.facts`. The facts shown are
marked reflected (`meta.reflected`), whatever the model made of them, so that the
same facts never trigger a reflection twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.inject.templates import render
from proxy.memory import jobs, records
from proxy.memory.db import Connection
from proxy.memory.llm import Target
from proxy.memory.llm_json import Parsed, normalise, read_importance
from proxy.memory.record import EMBED_JOB
from proxy.memory.records import MemoryRow, chunked, placeholders

if TYPE_CHECKING:
    from proxy.memory.jobs import Job
    from proxy.memory.schedule import JobContext

REFLECT_JOB = "reflect"
_KNOWN_INSIGHTS = 10

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "insights": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "importance": {"type": "number"},
                    "because": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["text", "importance", "because"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["insights"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class NewInsight:
    """An insight as the model gave it, checked; `facts` are memory ids."""

    text: str
    importance: float
    facts: tuple[int, ...]


# -- queueing ------------------------------------------------------------------------------


def unreflected_importance(conn: Connection, scope_id: int) -> float:
    """The summed importance of the scope's active facts not reflected on yet."""
    return conn.execute(
        "SELECT coalesce(sum(importance), 0) FROM memories WHERE scope_id = ? AND kind = 'fact'"
        " AND state = 'active' AND json_extract(meta, '$.reflected') IS NULL",
        (scope_id,),
    ).fetchone()[0]


def queue_if_due(
    conn: Connection, scope_id: int, threshold: float, target: dict[str, Any], now: float
) -> int | None:
    """Queue a `reflect` job if the new facts weigh enough and none is waiting."""
    if unreflected_importance(conn, scope_id) < threshold:
        return None
    waiting = conn.execute(
        "SELECT 1 FROM jobs WHERE scope_id = ? AND kind = ? AND state IN ('pending', 'running')",
        (scope_id, REFLECT_JOB),
    ).fetchone()
    if waiting:
        return None
    return jobs.enqueue(conn, REFLECT_JOB, dict(target), scope_id, now)


# -- the job ----------------------------------------------------------------------------------


async def handle_reflect(job: Job, ctx: JobContext) -> None:
    """Ask for insights on the unreflected facts and store them."""
    from proxy.memory.schedule import job_target, llm_allowed

    scope_id = job.scope_id
    if scope_id is None or not await ctx.store.read(llm_allowed, scope_id):
        return
    facts, insights, names = await ctx.store.read(_load, scope_id, ctx.config.reflect_facts)
    if not facts:
        return
    values = {
        **names,
        "count": str(ctx.config.reflect_insights),
        "facts": "\n".join(f"F{i}. {f.text}" for i, f in enumerate(facts, 1)),
        "insights": "\n".join(f"- {m.text}" for m in insights) or "(none)",
    }
    upstream, model = job_target(ctx.config, job.payload)
    new = await ctx.model.ask(
        Target(upstream, model),
        [
            {"role": "system", "content": render(ctx.prompts.reflect_system, values)},
            {"role": "user", "content": render(ctx.prompts.reflect_user, values)},
        ],
        name="insights",
        schema=SCHEMA,
        max_tokens=ctx.config.max_tokens,
        check=lambda parsed: read_insights(parsed, [f.id for f in facts]),
    )
    new = new[: max(1, ctx.config.reflect_insights)]
    added = await ctx.store.write(
        store_insights, scope_id, job.id, new, [f.id for f in facts], ctx.clock()
    )
    if added:
        ctx.wake()


def _load(
    conn: Connection, scope_id: int, limit: int
) -> tuple[list[MemoryRow], list[MemoryRow], dict[str, str]]:
    """The oldest unreflected facts (at most `limit`), the newest active insights and
    the names of the two speakers."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM memories WHERE scope_id = ? AND kind = 'fact' AND state = 'active'"
            " AND json_extract(meta, '$.reflected') IS NULL ORDER BY id LIMIT ?",
            (scope_id, limit),
        )
    ]
    facts = records.load_candidates(conn, scope_id, ids)
    insights = records.list_memories(conn, scope_id, kinds=["insight"], limit=_KNOWN_INSIGHTS)
    return facts, insights, _names(conn, scope_id)


def _names(conn: Connection, scope_id: int) -> dict[str, str]:
    """The character's and the user's names: the latest speakers of the scope."""
    names = {"char": "the character", "user": "the user"}
    for role, key in (("assistant", "char"), ("user", "user")):
        row = conn.execute(
            "SELECT speaker FROM messages WHERE scope_id = ? AND role = ? AND state != 'undone'"
            " AND speaker IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (scope_id, role),
        ).fetchone()
        if row:
            names[key] = row[0]
    return names


def read_insights(parsed: Parsed, fact_ids: list[int]) -> list[NewInsight]:
    """The insights of the model's answer (ValueError when none is in a usable shape).
    An insight that cites no known fact rests on all the facts shown."""
    value = parsed.value
    items: Any = value.get("insights") if isinstance(value, dict) else value
    if items is None and isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        items = lists[0] if len(lists) == 1 else None
    if not isinstance(items, list):
        raise ValueError("the answer has no 'insights' list")
    if parsed.truncated and items:
        items = items[:-1]
    out: list[NewInsight] = []
    for item in items:
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            continue
        text = item.get("text") or item.get("insight")
        if not isinstance(text, str) or not text.strip():
            continue
        cited = item.get("because", item.get("facts"))
        cited = cited if isinstance(cited, list) else [cited]
        ids = []
        for label in cited:
            digits = "".join(c for c in str(label) if c.isdigit()) if label is not None else ""
            if digits and 1 <= int(digits) <= len(fact_ids):
                ids.append(fact_ids[int(digits) - 1])
        out.append(
            NewInsight(
                text=" ".join(text.split()),
                importance=read_importance(item.get("importance"), default=0.7),
                facts=tuple(dict.fromkeys(ids)) or tuple(fact_ids),
            )
        )
    if items and not out:
        raise ValueError("none of the insights has a 'text'")
    return out


def store_insights(
    conn: Connection,
    scope_id: int,
    job_id: int,
    new: list[NewInsight],
    shown: list[int],
    now: float,
) -> list[int]:
    """Store the insights (not repeats of existing ones), mark the shown facts
    reflected, queue embedding and finish the job. Returns the insight ids."""
    existing = {
        normalise(m.text)
        for m in records.list_memories(conn, scope_id, kinds=["insight"], limit=1000)
    }
    added: list[int] = []
    for insight in new:
        key = normalise(insight.text)
        facts = records.load_candidates(conn, scope_id, insight.facts)
        if key in existing or not facts:
            continue  # a repeat, or its facts were retracted meanwhile
        sources = sorted({s for f in facts for s in f.sources})
        [insight_id] = records.insert_memories(
            conn,
            [
                records.NewMemory(
                    scope_id=scope_id,
                    kind="insight",
                    text=insight.text,
                    at=max(f.at for f in facts),
                    importance=insight.importance,
                    sources=_live(conn, scope_id, sources),
                    meta={"facts": [f.id for f in facts], "job": job_id},
                )
            ],
            now,
        )
        existing.add(key)
        added.append(insight_id)
    for chunk in chunked(shown):
        conn.execute(
            f"UPDATE memories SET meta = json_set(meta, '$.reflected', ?)"
            f" WHERE scope_id = ? AND id IN ({placeholders(chunk)})",
            (now, scope_id, *chunk),
        )
    if added:
        jobs.enqueue(conn, EMBED_JOB, {"memory_ids": added}, scope_id, now)
    jobs.finish(conn, job_id, now)
    return added


def _live(conn: Connection, scope_id: int, ids: list[int]) -> list[int]:
    live: list[int] = []
    for chunk in chunked(ids):
        live += [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM messages WHERE scope_id = ? AND state != 'undone'"
                f" AND id IN ({placeholders(chunk)})",
                (scope_id, *chunk),
            )
        ]
    return live
