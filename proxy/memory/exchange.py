"""Moving memory in and out of a scope: the scope document, chat imports, character cards.

- The scope document (``export_scope`` / ``import_scope``) is one JSON object holding
  everything a scope remembers: its transcript (every state), its memories (with their
  states, pins and sources), its summaries, its style sample and settings. Private
  messages (``X-Memory-Write: off``) go as the store holds them, ``"private": true``
  without text: a scope restored from it still knows them when the app sends them
  again, instead of storing them then as new messages with their text. It names
  nothing by database id: messages by ``seq``, memories by ``ref`` (their position,
  from 1), so that export, import into a new scope and export again give the same
  document apart from the scope's name. Vectors are left out (they are the embedding
  model's, and are made again after an import), as are the request log and jobs.
  An import is checked whole before anything is written, then written in batches;
  the seqs it will fill are taken by its first transaction (``begin_import``), so a
  chat or another import writing to the scope meanwhile goes after them.
- Chats (SillyTavern files, or messages posted in batches) go through the write path of
  live turns (``record.store_messages``), each chat into a new thread, a few hundred
  messages per write transaction so that the writer is never held for long.
- A character card becomes the scene (description, personality, scenario), the style
  sample (``first_mes``, then ``mes_example``) and notes (``character_book`` entries;
  the ``constant`` ones pinned).

Importing into a scope that already has messages is refused unless ``append`` is set:
a second chat in the same memory is a deliberate act, never an accident.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxy.memory import jobs, records, scope_state
from proxy.memory.db import Connection
from proxy.memory.errors import Invalid, Missing, Refused
from proxy.memory.importers import Card, ParsedChat, card_placeholders
from proxy.memory.manage import has_messages, scene_view, set_style
from proxy.memory.record import EMBED_JOB, new_message, store_messages
from proxy.memory.store import Store
from proxy.memory.transcript import message_fingerprint

FORMAT = "mnemoproxy.scope"
VERSION = 1
BATCH = 250  # messages per write transaction of an import
MAX_SEQ = 2**53  # the most a document can hold (seqs, chats): JSON-safe, as the API's MAX_ID

Progress = Callable[[int, int], None]


# -- the scope document ---------------------------------------------------------------


def export_scope(conn: Connection, scope_id: int) -> dict[str, Any]:
    """The whole scope as one JSON-ready document (see the module docstring)."""
    scope = records.get_scope_by_id(conn, None, scope_id)
    if scope is None:
        raise Missing("the scope no longer exists")
    messages = []
    seq_of: dict[int, int] = {}
    for row in conn.execute(
        "SELECT id, seq, thread, role, speaker, content, raw, fingerprint, seen_at, state,"
        " request_id, undone_at, private FROM messages WHERE scope_id = ? ORDER BY seq",
        (scope_id,),
    ):
        seq_of[row[0]] = row[1]
        # The key only where true: a document without private messages is the same as
        # before they existed (and older versions still import it).
        private = {"private": True} if row[12] else {}
        messages.append(
            {
                "seq": row[1],
                "thread": row[2],
                "role": row[3],
                "speaker": row[4],
                "content": row[5],
                "raw": json.loads(row[6]),
                "fingerprint": row[7],
                "seen_at": row[8],
                "state": row[9],
                "request_id": row[10],
                "undone_at": row[11],
                **private,
            }
        )
    sources: dict[int, list[int]] = {}
    for memory_id, message_id in conn.execute(
        "SELECT s.memory_id, s.message_id FROM memory_sources s"
        " JOIN memories m ON m.id = s.memory_id WHERE m.scope_id = ?",
        (scope_id,),
    ):
        sources.setdefault(memory_id, []).append(seq_of[message_id])
    rows = conn.execute(
        "SELECT id, kind, text, importance, at, created_at, state, superseded_by, pinned,"
        " speaker, role, meta FROM memories WHERE scope_id = ? ORDER BY id",
        (scope_id,),
    ).fetchall()
    ref_of = {row[0]: ref for ref, row in enumerate(rows, start=1)}
    memories = [
        {
            "ref": ref_of[row[0]],
            "kind": row[1],
            "text": row[2],
            "importance": row[3],
            "at": row[4],
            "created_at": row[5],
            "state": row[6],
            "superseded_by": ref_of.get(row[7]) if row[7] is not None else None,
            "pinned": bool(row[8]),
            "speaker": row[9],
            "role": row[10],
            "meta": json.loads(row[11]),
            "sources": sorted(sources.get(row[0], [])),
        }
        for row in rows
    ]
    summaries = [
        {
            "text": s.text,
            "created_at": s.created_at,
            "covers_until_seq": s.covers_until_seq,
            "state": s.state,
            "meta": s.meta,
        }
        for s in reversed(scope_state.list_summaries(conn, scope_id, limit=1_000_000))
    ]
    style = scope_state.get_style(conn, scope_id)
    return {
        "format": FORMAT,
        "version": VERSION,
        "scope": {
            "name": scope.name,
            "label": scope.label,
            "created_at": scope.created_at,
            "last_seen": scope.last_seen,
            "settings": scope.settings,
        },
        "messages": messages,
        "memories": memories,
        "summaries": summaries,
        "style": None
        if style is None
        else {
            "text": style.text,
            "message_seq": seq_of.get(style.message_id) if style.message_id else None,
            "source": style.source,
            "enabled": style.enabled,
            "updated_at": style.updated_at,
        },
    }


def check_document(doc: dict[str, Any]) -> None:
    """Refuse a document whose parts do not fit together (before anything is written):
    its format, duplicate seqs or refs, sources, ``superseded_by`` or the style's
    message naming what the document does not hold, more than one active summary, a
    private message without its fingerprint. `Invalid` names the field at fault as the
    API's validation does (``memories.2.sources``)."""
    for key, expected in (("format", FORMAT), ("version", VERSION)):
        if _get(doc, key, expected) != expected:
            raise Invalid(
                f"not a {FORMAT} document of version {VERSION} "
                f"(format {doc.get('format')!r}, version {doc.get('version')!r})",
                param=key,
            )
    seqs: set[int] = set()
    messages = doc.get("messages") or []
    for i, (seq, message) in enumerate(zip(_seqs(messages), messages, strict=True)):
        if seq in seqs:
            raise Invalid(
                f"message seq {seq} appears twice in the document", param=f"messages.{i}.seq"
            )
        seqs.add(seq)
        if message.get("private") and not message.get("fingerprint"):
            # Without its text, the fingerprint is all that a private message is.
            raise Invalid(
                f"private message {seq} has no fingerprint", param=f"messages.{i}.fingerprint"
            )
    memories = doc.get("memories") or []
    refs = _refs(memories)
    index_of: dict[int, int] = {}
    for i, ref in enumerate(refs):
        if index_of.setdefault(ref, i) != i:
            raise Invalid(
                f"memory ref {ref} appears twice in the document", param=f"memories.{i}.ref"
            )
    for i, (ref, memory) in enumerate(zip(refs, memories, strict=True)):
        missing = [s for s in memory.get("sources") or () if s not in seqs]
        if missing:
            raise Invalid(
                f"memory {ref}'s sources {missing} are not messages of the document",
                param=f"memories.{i}.sources",
            )
        later = memory.get("superseded_by")
        if later is not None and later not in index_of:
            raise Invalid(
                f"memory {ref} is superseded by {later}, not in the document",
                param=f"memories.{i}.superseded_by",
            )
    _check_supersession(
        dict(zip(refs, (m.get("superseded_by") for m in memories), strict=True)), index_of
    )
    style = doc.get("style") or {}
    if style.get("message_seq") is not None and style["message_seq"] not in seqs:
        raise Invalid(
            f"style.message_seq {style['message_seq']} is not a message of the document",
            param="style.message_seq",
        )
    summaries = doc.get("summaries") or []
    active = sum(_get(s, "state", "active") == "active" for s in summaries)
    if active > 1:
        raise Invalid(
            f"the document has {active} active summaries; a scope has one at most "
            "(the others are 'archived')",
            param="summaries",
        )


def _check_supersession(later_of: dict[int, int | None], index_of: dict[int, int]) -> None:
    """Refuse a memory superseded by itself, directly or through others (`index_of`:
    each ref's place in the document, to name the field)."""
    settled: set[int] = set()  # refs whose chain ends
    for ref in later_of:
        chain: list[int] = []
        current: int | None = ref
        while current is not None and current not in settled:
            if current in chain:
                raise Invalid(
                    f"memory {current} is superseded by itself (via {chain})",
                    param=f"memories.{index_of[current]}.superseded_by",
                )
            chain.append(current)
            current = later_of.get(current)
        settled.update(chain)


@dataclass(frozen=True)
class ImportPlan:
    """Where an imported document goes in its scope."""

    seq_offset: int  # after the scope's last message
    thread_offset: int  # its chats after the scope's own
    fresh: bool  # the scope was empty: its dates, label and settings come from the document
    written: dict[int, int]  # {document seq: new id} of the message written with the plan


def begin_import(
    conn: Connection, scope_id: int, doc: dict[str, Any], *, append: bool, now: float
) -> ImportPlan:
    """Check that the scope may take the document (Refused if it has messages and not
    ``append``; `Invalid` if a seq or chat, moved after the scope's own, would pass
    ``MAX_SEQ``), say where its messages go, and write its last message (highest seq).

    That message takes the import's seqs at once: a chat or another import writing to
    the scope while the rest is written in batches goes after them (messages are
    appended after the scope's highest seq), and another import into the same empty
    scope is refused.
    """
    last_seq, last_thread, count = conn.execute(
        "SELECT coalesce(max(seq), 0), coalesce(max(thread), 0), count(*) FROM messages"
        " WHERE scope_id = ?",
        (scope_id,),
    ).fetchone()
    # Memories without messages (a card's notes, a notes-only document) count too: a
    # second import of the same document would have doubled every one of them.
    if not append and (
        count
        or conn.execute(
            "SELECT 1 FROM memories WHERE scope_id = ? AND state = 'active' LIMIT 1", (scope_id,)
        ).fetchone()
    ):
        raise Refused(_not_empty("messages or memories"))
    fresh = records.scope_is_empty(conn, scope_id)
    plan = ImportPlan(last_seq, last_thread + 1 if count else 0, fresh, {})
    messages = doc.get("messages") or []
    seqs = _seqs(messages)
    _check_room(doc, seqs, plan)
    if not messages:
        return plan
    top = max(range(len(seqs)), key=seqs.__getitem__)
    written = restore_messages(conn, scope_id, [messages[top]], [seqs[top]], plan, now)
    return replace(plan, written=written)


def _check_room(doc: dict[str, Any], seqs: Sequence[int], plan: ImportPlan) -> None:
    """Refuse a document whose seqs or chats, after the scope's own, would pass
    ``MAX_SEQ``: stored, they would export to a document no import takes."""
    last = max(seqs, default=0)
    if last + plan.seq_offset > MAX_SEQ:
        raise Invalid(
            f"message seq {last} after the scope's last message ({plan.seq_offset}) would be "
            f"{last + plan.seq_offset}, past {MAX_SEQ}; import into a new scope, or number "
            "the document's messages from 1",
            param=f"messages.{seqs.index(last)}.seq",
        )
    threads = [_get(m, "thread", 0) for m in doc.get("messages") or []]
    if max(threads, default=0) + plan.thread_offset > MAX_SEQ:
        raise Invalid(
            f"message thread {max(threads)} after the scope's chats ({plan.thread_offset}) "
            f"would pass {MAX_SEQ}; import into a new scope",
            param=f"messages.{threads.index(max(threads))}.thread",
        )
    covers = [_get(s, "covers_until_seq", 0) for s in doc.get("summaries") or []]
    if max(covers, default=0) + plan.seq_offset > MAX_SEQ:
        raise Invalid(
            f"summary covers_until_seq {max(covers)} after the scope's last message "
            f"({plan.seq_offset}) would pass {MAX_SEQ}; import into a new scope",
            param=f"summaries.{covers.index(max(covers))}.covers_until_seq",
        )


def restore_messages(
    conn: Connection,
    scope_id: int,
    messages: Sequence[dict[str, Any]],
    seqs: Sequence[int],
    plan: ImportPlan,
    now: float,
) -> dict[int, int]:
    """Insert messages of the document as they were; return {document seq: new id}.
    A private message keeps no text even if the document gives it some."""
    ids: dict[int, int] = {}
    for seq, message in zip(seqs, messages, strict=True):
        private = bool(message.get("private"))
        raw = message.get("raw") or {"role": message["role"], "content": message["content"]}
        state = _get(message, "state", "active")
        ids[seq] = conn.execute(
            "INSERT INTO messages (scope_id, seq, role, speaker, content, raw, fingerprint,"
            " seen_at, state, request_id, undone_at, thread, private)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                scope_id,
                seq + plan.seq_offset,
                message["role"],
                None if private else message.get("speaker"),
                "" if private else message["content"],
                "{}" if private else json.dumps(raw, ensure_ascii=False),
                message.get("fingerprint") or message_fingerprint(raw),
                _get(message, "seen_at", now),
                state,
                message.get("request_id"),
                _get(message, "undone_at", now if state == "undone" else None),
                _get(message, "thread", 0) + plan.thread_offset,
                int(private),
            ),
        ).lastrowid
    return ids


def restore_memories(
    conn: Connection,
    scope_id: int,
    memories: Sequence[dict[str, Any]],
    refs: Sequence[int],
    message_ids: dict[int, int],
    now: float,
) -> dict[int, int]:
    """Insert memories of the document with their states; return {ref: new id}.
    (Links to later memories, ``superseded_by``, are made by ``finish_import``.)"""
    ids: dict[int, int] = {}
    for ref, memory in zip(refs, memories, strict=True):
        (ids[ref],) = records.insert_memories(
            conn,
            [
                records.NewMemory(
                    scope_id=scope_id,
                    kind=memory["kind"],
                    text=memory["text"],
                    at=_get(memory, "at", now),
                    importance=_get(memory, "importance", 0.5),
                    speaker=memory.get("speaker"),
                    role=memory.get("role"),
                    pinned=_get(memory, "pinned", False),
                    sources=[message_ids[s] for s in memory.get("sources") or ()],
                    meta=memory.get("meta") or {},
                )
            ],
            _get(memory, "created_at", now),
        )
        state = _get(memory, "state", "active")
        if state != "active":
            conn.execute("UPDATE memories SET state = ? WHERE id = ?", (state, ids[ref]))
    return ids


def finish_import(
    conn: Connection,
    scope_id: int,
    doc: dict[str, Any],
    message_ids: dict[int, int],
    memory_ids: dict[int, int],
    plan: ImportPlan,
    now: float,
) -> dict[str, Any]:
    """The rest of a document, once its messages and memories are in: links between
    memories, summaries, the style sample, the scope's own fields, the embedding job."""
    memories = doc.get("memories") or []
    for ref, memory in zip(_refs(memories), memories, strict=True):
        if memory.get("superseded_by") is not None:
            conn.execute(
                "UPDATE memories SET superseded_by = ? WHERE id = ?",
                (memory_ids[memory["superseded_by"]], memory_ids[ref]),
            )
    kept: list[str] = []
    summaries = doc.get("summaries") or []
    has_summary = scope_state.current_summary(conn, scope_id) is not None
    if has_summary and any(_get(s, "state", "active") == "active" for s in summaries):
        kept.append("summary")
    for summary in summaries:
        state = _get(summary, "state", "active")
        if state == "active" and has_summary:
            state = "archived"  # one active summary: the scope's own, or the first
        conn.execute(
            "INSERT INTO summaries (scope_id, text, created_at, covers_until_seq, state, meta)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                scope_id,
                summary["text"],
                _get(summary, "created_at", now),
                _get(summary, "covers_until_seq", 0) + plan.seq_offset,
                state,
                json.dumps(summary.get("meta") or {}, ensure_ascii=False),
            ),
        )
        has_summary = has_summary or state == "active"
    style = doc.get("style")
    if style is not None and scope_state.get_style(conn, scope_id) is not None:
        kept.append("style")
    elif style is not None:
        seq = style.get("message_seq")
        conn.execute(
            "INSERT INTO style (scope_id, text, message_id, source, enabled, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                scope_id,
                style["text"],
                message_ids.get(seq) if seq is not None else None,
                _get(style, "source", "manual"),
                int(_get(style, "enabled", True)),
                _get(style, "updated_at", now),
            ),
        )
    scope = doc.get("scope") or {}
    if plan.fresh:
        conn.execute(
            "UPDATE scopes SET label = coalesce(?, label), created_at = ?, last_seen = ?,"
            " settings = ? WHERE id = ?",
            (
                scope.get("label"),
                _get(scope, "created_at", now),
                _get(scope, "last_seen", now),
                json.dumps(scope.get("settings") or {}),
                scope_id,
            ),
        )
    else:
        if scope.get("label"):
            conn.execute(
                "UPDATE scopes SET label = ? WHERE id = ? AND label IS NULL",
                (scope["label"], scope_id),
            )
        kept += _merge_settings(conn, scope_id, scope.get("settings") or {})
    active = [
        memory_ids[ref]
        for ref, m in zip(_refs(memories), memories, strict=True)
        if _get(m, "state", "active") == "active"
    ]
    if active:
        jobs.enqueue(conn, EMBED_JOB, {"memory_ids": active}, scope_id, now)
    return {
        "messages": len(message_ids),
        "memories": len(memory_ids),
        "summaries": len(summaries),
        "style": style is not None and "style" not in kept,
        "kept_existing": kept,
    }


async def import_scope(
    store: Store,
    scope_id: int,
    doc: dict[str, Any],
    *,
    append: bool,
    now: float,
    batch: int = BATCH,
) -> dict[str, Any]:
    """Restore a scope document into the scope; return what was added.

    ``doc`` has the document's shape (the route validated it); it is checked whole
    (``check_document``) before anything is written, then written ``batch`` messages
    or memories per transaction, so that live chats are never kept waiting long (the
    first transaction takes the document's seqs: see ``begin_import``).
    Into an empty scope everything is restored as it was, dates and settings included.
    Otherwise (``append``, or a scope with a summary, style sample or settings of its
    own) the document's chats become new threads after the scope's own messages, and
    the scope keeps its own summary, style sample and settings; the settings it has
    none of (a scene, say) come from the document. ``kept_existing`` names what of the
    document's was left out for the scope's own.
    """
    check_document(doc)
    plan = await store.write(begin_import, scope_id, doc, append=append, now=now)
    messages = doc.get("messages") or []
    rest = [(s, m) for s, m in zip(_seqs(messages), messages, strict=True) if s not in plan.written]
    message_ids = dict(plan.written)
    for start in range(0, len(rest), batch):
        part = rest[start : start + batch]
        message_ids |= await store.write(
            restore_messages, scope_id, [m for _, m in part], [s for s, _ in part], plan, now
        )
    memories = doc.get("memories") or []
    refs = _refs(memories)
    memory_ids: dict[int, int] = {}
    for start in range(0, len(memories), batch):
        end = start + batch
        memory_ids |= await store.write(
            restore_memories, scope_id, memories[start:end], refs[start:end], message_ids, now
        )
    return await store.write(finish_import, scope_id, doc, message_ids, memory_ids, plan, now)


def _get(item: dict[str, Any], key: str, default: Any) -> Any:
    """``item[key]``, or ``default`` when it is missing or null (a hand-written document
    may leave out what an export always has)."""
    value = item.get(key)
    return default if value is None else value


def _seqs(messages: Sequence[dict[str, Any]]) -> list[int]:
    """Each message's seq: as given, else its position (from 1)."""
    return [_get(m, "seq", position) for position, m in enumerate(messages, start=1)]


def _refs(memories: Sequence[dict[str, Any]]) -> list[int]:
    """Each memory's ref: as given, else its position (from 1)."""
    return [_get(m, "ref", position) for position, m in enumerate(memories, start=1)]


def _merge_settings(conn: Connection, scope_id: int, settings: dict[str, Any]) -> list[str]:
    """Give the scope the document's settings (its scene, its switches) that it has
    none of; return "settings.<key>" for each it keeps a value of its own for."""
    row = conn.execute("SELECT settings FROM scopes WHERE id = ?", (scope_id,)).fetchone()
    own = json.loads(row[0]) if row else {}
    merged = {**settings, **own}
    if merged != own:
        conn.execute("UPDATE scopes SET settings = ? WHERE id = ?", (json.dumps(merged), scope_id))
    return [f"settings.{key}" for key in settings if key in own and own[key] != settings[key]]


def _not_empty(what: str = "messages") -> str:
    return (
        f"this scope already has {what}; import into a new scope, or append to this one "
        "(append=true, or --append) to add the import as another chat"
    )


# -- chats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat to import."""

    role: str  # user | assistant | system
    content: str
    name: str | None = None  # the speaker, when known
    date: float | None = None  # unix seconds; None: the previous message's date


def append_chat(
    conn: Connection,
    scope_id: int,
    messages: Sequence[ChatMessage],
    *,
    thread: int | None,
    append: bool,
    now: float,
    char: str | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """Append a batch of a chat (one write transaction) through the live write path.

    ``thread=None`` starts a new chat (refused in a scope with messages unless
    ``append``); later batches of the same chat pass the thread the first one got.
    A message without a date gets the previous one's (else ``now``).
    """
    if thread is None:
        if not append and has_messages(conn, scope_id):
            raise Refused(_not_empty())
        thread = records.new_thread(conn, scope_id)
    elif not conn.execute(
        "SELECT 1 FROM messages WHERE scope_id = ? AND thread = ? LIMIT 1", (scope_id, thread)
    ).fetchone():
        raise Missing(f"no chat (thread) {thread} in this scope")
    rows = []
    date = None
    for message in messages:
        date = message.date if message.date is not None else (date or now)
        body = {"role": message.role, "content": message.content}
        row = new_message(body, seen_at=date, char=char, user=user)
        if message.name:
            row = replace(row, speaker=message.name)
        rows.append(row)
    ids, memory_ids = store_messages(conn, scope_id, rows, thread=thread, request_id=None, now=now)
    _capture_style(conn, scope_id, now)
    return {"thread": thread, "messages": len(ids), "memories": len(memory_ids)}


async def import_chat(
    store: Store,
    scope_id: int,
    chat: ParsedChat,
    *,
    append: bool,
    now: float,
    batch: int = BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Import a parsed SillyTavern chat as a new chat of the scope, ``batch`` messages
    per write; ``progress(done, total)`` after each. Lines that could not be read are
    reported, not imported; the rest is."""
    date = chat.created
    messages = []
    for m in chat.messages:
        date = m.date if m.date is not None else date
        messages.append(ChatMessage(m.role, m.text, m.name, date))
    total = len(messages)
    thread: int | None = None
    stored = 0
    memories = 0
    for start in range(0, total, batch):
        result = await store.write(
            append_chat,
            scope_id,
            messages[start : start + batch],
            thread=thread,
            append=append,
            now=now,
            char=chat.character_name,
            user=chat.user_name,
        )
        thread = result["thread"]
        stored += result["messages"]
        memories += result["memories"]
        if progress is not None:
            progress(stored, total)
    return {
        "thread": thread,
        "messages": stored,
        "memories": memories,
        "character_name": chat.character_name,
        "user_name": chat.user_name,
        "errors": [{"line": e.line, "message": e.message} for e in chat.errors],
        "warnings": [{"line": w.line, "message": w.message} for w in chat.warnings],
    }


def _capture_style(conn: Connection, scope_id: int, now: float) -> None:
    """As a live turn does: the scope's first assistant message becomes its style sample."""
    if scope_state.get_style(conn, scope_id) is not None:
        return
    row = conn.execute(
        "SELECT id, content FROM messages WHERE scope_id = ? AND role = 'assistant'"
        " AND state = 'active' AND private = 0 AND trim(content) != '' ORDER BY seq LIMIT 1",
        (scope_id,),
    ).fetchone()
    if row:
        scope_state.set_style(conn, scope_id, row[1], "auto", now, message_id=row[0])


# -- character cards ------------------------------------------------------------------

_START = re.compile(r"^\s*<START>\s*$", re.IGNORECASE | re.MULTILINE)


def apply_card(
    conn: Connection, scope_id: int, card: Card, *, append: bool, now: float
) -> dict[str, Any]:
    """Make a card the scope's scene, style sample and notes (one transaction).

    Scene: ``character`` = description (+ personality), ``location`` = scenario,
    ``char_name`` = the card's name. Style sample: ``first_mes``, then ``mes_example``
    (both show how the character speaks; the style section is cut to its cap where
    a pinned note that is too long would be left out whole). Notes: the enabled
    lorebook entries, pinned when ``constant``. {{char}} and {{user}} are replaced
    (the user's name from the scene, else "User", as SillyTavern's default persona).
    """
    if not append and has_messages(conn, scope_id):
        raise Refused(_not_empty())
    row = conn.execute("SELECT settings, label FROM scopes WHERE id = ?", (scope_id,)).fetchone()
    settings = json.loads(row[0])
    char = card.nickname or card.name
    user = scene_view(settings).get("user_name") or "User"

    def text(value: str) -> str:
        return card_placeholders(value, char, user).strip()

    scene = scene_view(settings)
    character = text(card.description)
    if card.personality.strip():
        personality = text(card.personality)
        character = f"{character}\n{char}'s personality: {personality}".strip()
    updates = {"character": character, "location": text(card.scenario), "char_name": char}
    for key, value in updates.items():
        if value:
            scene[key] = value
    records.update_scope_settings(conn, scope_id, {"scene": scene})
    if row[1] is None:
        conn.execute("UPDATE scopes SET label = ? WHERE id = ?", (card.name, scope_id))

    examples = _START.sub("", text(card.mes_example)).strip()
    sample = "\n\n".join(part for part in (text(card.first_mes), examples) if part)
    if sample:
        set_style(conn, scope_id, sample, now=now)
    notes = [
        records.NewMemory(
            scope_id=scope_id,
            kind="note",
            text=text(entry.content),
            at=now,
            importance=0.6,
            pinned=entry.constant,
            meta={
                "source": "card",
                "card": card.name,
                "keys": entry.keys,
                "comment": entry.comment,
            },
        )
        for entry in card.book
        if entry.enabled and entry.content.strip()
    ]
    # A card imported again (edited, say) replaces the notes it brought last time: the
    # same ones stay as they are, the others are retracted.
    earlier = {
        (text_, bool(pinned)): memory_id
        for memory_id, text_, pinned in conn.execute(
            "SELECT id, text, pinned FROM memories WHERE scope_id = ? AND kind = 'note'"
            " AND state = 'active' AND json_extract(meta, '$.source') = 'card'"
            " AND json_extract(meta, '$.card') = ?",
            (scope_id, card.name),
        )
    }
    notes = [n for n in notes if earlier.pop((n.text, n.pinned), None) is None]
    retracted = records.retract_memories(conn, scope_id, list(earlier.values()))
    note_ids = records.insert_memories(conn, notes, now)
    if note_ids:
        jobs.enqueue(conn, EMBED_JOB, {"memory_ids": note_ids}, scope_id, now)
    return {
        "name": card.name,
        "spec": card.spec,
        "scene": scene_view({"scene": scene}),
        "style_sample": bool(sample),
        "notes": len(note_ids),
        "pinned_notes": sum(n.pinned for n in notes),
        "notes_retracted": len(retracted),
        "warnings": list(card.warnings),
    }
