"""Writing one chat turn into the store: step 9 of a request, in one short transaction.

The request is aligned again here, on the writer thread, against the transcript as it
is now (another request of the same scope may have landed since this one was
prepared). Then, atomically: undone messages are retracted with the memories that
came only from them, new messages and the reply are appended, each becomes one or more
`turn` memories, an `embed` job is queued for the worker, the style sample is captured
if the scope has none, and the request log entry is written.

A turn asked not to be remembered (`X-Memory-Write: off`, `Write.PRIVATE`) is aligned
and undoes like any other, but its new messages and reply are stored as *private*
placeholders: role, fingerprint and place in the chat, no text, no memories. The app
sends them again with the next requests, and alignment must know them, or they would
be stored then as new messages after all. A message identical to a private one of the
scope stays private wherever it comes back (a swipe brought back, an edit above it, a
continue of it): privacy errs on the side of forgetting.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from proxy.memory import jobs, records
from proxy.memory.db import Connection
from proxy.memory.transcript import (
    Alignment,
    StoredMessage,
    TranscriptIndex,
    align,
    message_fingerprint,
)
from proxy.messages import is_conversation, message_text, without_reasoning
from proxy.style.sample import capture_style, drop_undone_style

if TYPE_CHECKING:
    from proxy.memory.schedule import TurnJobs

EMBED_JOB = "embed"
CHUNK_CHARS = 800  # ~200 tokens: all-MiniLM-L6-v2 reads at most 256


class Write(Enum):
    """What a chat request stores of its exchange."""

    ALL = "all"  # an ordinary turn: messages, memories, background jobs
    # `X-Memory-Write: off`: the exchange is part of the chat, but private: its messages
    # are stored without their text (for alignment only), and nothing else is.
    PRIVATE = "private"
    # Not part of the chat (an app's utility call, a scope with memory off): the
    # transcript is not touched; the request log entry only.
    NOTHING = "nothing"


@dataclass(frozen=True)
class Turn:
    """What one chat request adds to its scope."""

    scope_id: int
    messages: Sequence[dict[str, Any]]  # as the app sent them
    reply: dict[str, Any] | None  # the assistant's message; None: nothing to store
    partial: bool  # the reply was cut short (client gone, upstream failed)
    char: str | None
    user: str | None
    now: float
    request_id: str
    max_blind_undo: int = 4
    capture_style: bool = True
    log: dict[str, Any] | None = None  # request log entry; None: no log
    # The log entry's date: when the proxy handled the request, by the clock (retention
    # and paging compare it with the clock); None: `now`. `now` goes into the entry.
    logged_at: float | None = None
    write: Write = Write.ALL
    # The request said `X-Memory-Write: off` (a utility call may too): its log entry
    # keeps no text, whatever it stores.
    write_off: bool = False
    background: TurnJobs | None = None  # background LLM jobs to queue (facts, summary)


@dataclass(frozen=True)
class Recorded:
    """What a turn changed, for caches and the request log."""

    kind: str = "none"
    appended: tuple[int, ...] = ()
    undone: tuple[int, ...] = ()
    retracted: tuple[int, ...] = ()
    memories: tuple[int, ...] = ()
    jobs: tuple[int, ...] = ()  # background LLM jobs queued
    private: bool = False  # the request's chat holds private messages (see `_remember`)
    # The transcript after the turn, indexed here on the writer's thread, not the loop's.
    transcript: TranscriptIndex | None = field(default=None, repr=False)


def record_turn(conn: Connection, turn: Turn) -> Recorded:
    """Apply `turn` (run it with `Store.write`)."""
    result = Recorded()
    if turn.write is not Write.NOTHING:
        result = _remember(conn, turn)
    if turn.log is not None:
        detail = {**turn.log, "now": turn.now, "recorded": _summary(result)}
        if turn.write_off or result.private:  # what was said privately is kept nowhere
            detail.pop("messages", None)
            detail.update(reply=None, private=True)
        logged_at = turn.now if turn.logged_at is None else turn.logged_at
        jobs.log_request(conn, turn.request_id, turn.scope_id, detail, logged_at)
    records.touch_scope(conn, turn.scope_id, turn.now)
    return result


def transcript_index(conn: Connection, scope_id: int) -> TranscriptIndex:
    """The scope's active transcript, indexed for `align`."""
    return TranscriptIndex([StoredMessage(*e) for e in records.active_transcript(conn, scope_id)])


def _remember(conn: Connection, turn: Turn) -> Recorded:
    sent = turn.messages
    turn = _continued(turn)
    index = transcript_index(conn, turn.scope_id)
    stored = index.stored
    alignment = align(list(turn.messages), index, max_blind_undo=turn.max_blind_undo)
    retracted = records.undo_messages(conn, turn.scope_id, alignment.undone, turn.now)
    if alignment.undone:
        drop_undone_style(conn, turn.scope_id, set(alignment.undone))

    reused_at = _reused_dates(conn, turn.scope_id, alignment.reuses)
    stored_private = index.private
    private = _still_private(conn, turn, sent, alignment, stored_private)
    rows: list[records.NewMessage] = []
    for index in alignment.new:
        message = turn.messages[index]
        seen_at = reused_at.get(index, turn.now)
        rows.append(_new_message(message, turn, seen_at, "active", index in private))
    if turn.reply is not None and (
        without_reasoning(message_text(turn.reply)) or turn.reply.get("tool_calls")
    ):
        state = "partial" if turn.partial else "active"
        rows.append(_new_message(turn.reply, turn, turn.now, state, turn.write is Write.PRIVATE))
    thread = alignment.thread
    if thread is None:
        thread = records.new_thread(conn, turn.scope_id)
    ids, memory_ids = store_messages(
        conn, turn.scope_id, rows, thread=thread, request_id=turn.request_id, now=turn.now
    )

    if turn.capture_style:
        capture_style(conn, turn.scope_id, turn.now)
    queued: list[int] = []
    if turn.background is not None:
        # Private messages make no facts (`facts.queue_extract` skips them).
        queued = turn.background.queue(conn, turn.scope_id, alignment, ids, retracted)

    undone = set(alignment.undone)
    transcript = TranscriptIndex(
        [m for m in stored if m.id not in undone]
        + [
            StoredMessage(message_id, row.role, row.fingerprint, thread, row.private)
            for message_id, row in zip(ids, rows, strict=True)
        ]
    )
    return Recorded(
        kind=alignment.kind,
        appended=tuple(ids),
        undone=alignment.undone,
        retracted=tuple(retracted),
        memories=tuple(memory_ids),
        jobs=tuple(queued),
        private=any(row.private for row in rows)
        or any(sid in stored_private for _, sid in alignment.matched),
        transcript=transcript,
    )


def _still_private(
    conn: Connection,
    turn: Turn,
    sent: Sequence[dict[str, Any]],
    alignment: Alignment,
    stored_private: frozenset[int],
) -> set[int]:
    """The request indices among the new ones to store as private messages.

    - In a private turn, its exchange: the new messages after the request's last
      assistant message (older ones the proxy has not stored yet, such as the reply of
      a group chat's utility call, are no part of it; the greeting of a new chat
      neither).
    - A reply that takes the place of an undone private reply (in order): the app sends
      a private reply back changed (incomplete sentences trimmed, markdown fixed, a
      continue glued on, a group member's name moved into `name`). Privacy errs on the
      side of forgetting: a reply the user wrote there instead stays private too. (The
      user's own message edited and sent with memory on is the user's new message.)
    - A message identical to a private message of the scope, as sent or as
      `_continued` made them (a private reply brought back by a swipe).
    """
    new = alignment.new
    if not new:
        return set()
    private: set[int] = set()
    if turn.write is Write.PRIVATE:
        roles = [m.get("role") for m in turn.messages]
        last_reply = max((i for i, r in enumerate(roles) if r == "assistant"), default=-1)
        private.update(i for i in new if i > last_reply)
    if stored_private.intersection(alignment.undone):
        ids = alignment.undone
        undone = records.get_messages(conn, turn.scope_id, include_undone=True, ids=ids)
        for old, index in zip(undone, new, strict=False):
            if old.private and old.role == "assistant" == turn.messages[index].get("role"):
                private.add(index)
    fingerprints = {
        index: {message_fingerprint(turn.messages[index]), message_fingerprint(sent[index])}
        for index in new
        if index not in private
    }
    if fingerprints:
        known = records.private_fingerprints(
            conn, turn.scope_id, set().union(*fingerprints.values())
        )
        private.update(index for index, fps in fingerprints.items() if fps & known)
    return private


def _continued(turn: Turn) -> Turn:
    """A request that ends with the assistant's own text (SillyTavern's "continue" with
    prefill, an API prefill) gets the rest of that message as its reply: the message
    is stored whole, as the app will send it next, not as two.

    Not so when nobody has spoken to the assistant yet: that message is the chat's
    greeting, and SillyTavern sends the same shape when Send is pressed with an empty
    box, asking for a new message (glued on, the reply made a greeting no request ever
    shows again)."""
    conv = [m for m in turn.messages if is_conversation(m)]
    last, reply = (conv[-1] if conv else None), turn.reply
    if (
        turn.partial
        or reply is None
        or last is None
        or last.get("role") != "assistant"
        or not any(m.get("role") == "user" for m in conv)
        or not isinstance(last.get("content"), str)
        or not isinstance(reply.get("content"), str)
        or last.get("tool_calls")
        or reply.get("tool_calls")
    ):
        return turn
    whole = {**last, "content": last["content"] + reply["content"]}
    messages = list(turn.messages)
    messages[max(i for i, m in enumerate(messages) if m is last)] = whole
    return dataclasses.replace(turn, messages=messages, reply=None)


def store_messages(
    conn: Connection,
    scope_id: int,
    rows: Sequence[records.NewMessage],
    *,
    thread: int,
    request_id: str | None,
    now: float,
) -> tuple[list[int], list[int]]:
    """Append messages to chat `thread`, make each a `turn` memory (cut into pieces
    the embedding model can read whole) and queue their embedding. A private message
    has no text and makes no memory.

    The one write path of transcript messages: live turns and imports both use it.
    Returns the message ids and the memory ids.
    """
    ids = records.append_messages(conn, scope_id, rows, request_id, thread)
    memories = [
        records.NewMemory(
            scope_id=scope_id,
            kind="turn",
            text=chunk,
            at=row.seen_at,
            speaker=row.speaker,
            role=row.role,
            sources=(message_id,),
        )
        for message_id, row in zip(ids, rows, strict=True)
        if row.role in ("user", "assistant") and not row.private
        for chunk in split_text(row.content)
    ]
    memory_ids = records.insert_memories(conn, memories, now)
    if memory_ids:
        jobs.enqueue(conn, EMBED_JOB, {"memory_ids": memory_ids}, scope_id, now)
    return ids, memory_ids


def new_message(
    message: dict[str, Any],
    *,
    seen_at: float,
    char: str | None = None,
    user: str | None = None,
    state: str = "active",
    private: bool = False,
) -> records.NewMessage:
    """A transcript row for a chat message; the speaker is its `name`, else the
    character's or the user's name by role. An assistant's reasoning is left out of
    its content (and so of its memories); `raw` keeps the message as it came.

    A `private` row keeps only the role and the fingerprint (alignment's need): no
    content, raw or speaker."""
    role = message.get("role", "user")
    if private:
        return records.NewMessage(
            role=role,
            content="",
            fingerprint=message_fingerprint(message),
            seen_at=seen_at,
            state=state,
            private=True,
        )
    content = message_text(message)
    if role == "assistant":
        content = without_reasoning(content)
    speaker = message.get("name") if isinstance(message.get("name"), str) else None
    if speaker is None:
        speaker = char if role == "assistant" else user if role == "user" else None
    return records.NewMessage(
        role=role,
        content=content,
        fingerprint=message_fingerprint(message),
        seen_at=seen_at,
        raw=dict(message),
        speaker=speaker,
        state=state,
    )


def _new_message(
    message: dict[str, Any], turn: Turn, seen_at: float, state: str, private: bool = False
) -> records.NewMessage:
    return new_message(
        message, seen_at=seen_at, char=turn.char, user=turn.user, state=state, private=private
    )


def _reused_dates(
    conn: Connection, scope_id: int, reuses: Sequence[tuple[int, int]]
) -> dict[int, float]:
    """A re-sent message keeps the date it was first seen (an edit above it re-sends it)."""
    if not reuses:
        return {}
    rows = records.get_messages(
        conn, scope_id, include_undone=True, ids=[stored_id for _, stored_id in reuses]
    )
    seen = {row.id: row.seen_at for row in rows}
    return {index: seen[stored_id] for index, stored_id in reuses if stored_id in seen}


def _summary(result: Recorded) -> dict[str, Any]:
    return {
        "alignment": result.kind,
        "appended": list(result.appended),
        "undone": list(result.undone),
        "retracted": list(result.retracted),
    }


_BREAKS = re.compile(r"\n\s*\n|(?<=[.!?…])\s+")


def split_text(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Cut a long message into pieces of at most `limit` characters for embedding,
    at paragraph or sentence ends where possible (each piece is one memory)."""
    text = text.strip()
    if not text:
        return []
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    for part in _BREAKS.split(text):
        while len(part) > limit:  # one sentence longer than a piece: cut at a space
            cut = part.rfind(" ", 0, limit)
            cut = cut if cut > limit // 2 else limit
            if current:
                pieces.append(current)
                current = ""
            pieces.append(part[:cut].strip())
            part = part[cut:].strip()
        if current and len(current) + 1 + len(part) > limit:
            pieces.append(current)
            current = part
        else:
            current = f"{current} {part}".strip() if current else part
    if current:
        pieces.append(current)
    return [p for p in pieces if p]
