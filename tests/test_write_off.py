"""`X-Memory-Write: off`, driven like SillyTavern drives it: the exchange it marks is
kept in the transcript as private placeholders (no text), so that the next ordinary
requests, which carry it again, neither store nor ever show it; utility calls still
leave nothing at all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.memory import records
from proxy.memory.db import APPLICATION_ID, open_connection
from proxy.memory.migrations import MIGRATIONS, latest_version, migration_number, schema_version
from proxy.memory.transcript import conversation_indices, message_fingerprint
from tests.background_helpers import MemoryModel, background_proxy, wait_for_jobs
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import GREETING, open_store, st_body, st_messages, transcript_of

OFF = {"X-Memory-Write": "off"}
SECRET = "My secret: the spare key is under the blue stone by the well."
SECRET_REPLY = "Then the blue stone keeps it, and so do I."
SUMMARIZE = (
    "[Pause your roleplay. Summarize the most important facts and events in the story so "
    "far. Limit the summary to 200 words or less.]"
)


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def proxy(make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path) -> RunningServer:
    return make_proxy(
        {"local": up},
        memory={"enabled": True, "database": str(tmp_path / "memory.db")},
        embeddings={"backend": "upstream", "upstream": "local", "model": "fake-model"},
    )


def send(
    proxy: RunningServer,
    up: FakeUpstream,
    scope: str,
    history: list[tuple[str, str]],
    reply: str | None,
    headers: dict[str, str] | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
) -> httpx.Response:
    """One chat request of `scope` (the whole history, as SillyTavern sends it)."""
    if reply is not None:
        up.enqueue(Reply(text=reply))
    body = st_body(history)
    if messages is not None:
        body["messages"] = messages
    response = httpx.post(
        f"{proxy.url}/s/{scope}/v1/chat/completions",
        json=body,
        headers=headers or {},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def api(proxy: RunningServer, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{proxy.url}/memory{path}", timeout=30, **kwargs)
    assert response.status_code < 300, response.text
    return response.json() if response.content else None


def memories_of(db: Path, scope: str) -> list[records.MemoryRow]:
    """Every memory of the scope, in any state."""
    store = open_store(db)
    try:
        row = store.read_sync(records.get_scope, "", scope)
        assert row is not None
        states = ("active", "retracted", "superseded")
        return store.read_sync(records.list_memories, row.id, states=states, limit=10_000)
    finally:
        store.close_sync()


def live(rows: list[records.MessageRow]) -> list[records.MessageRow]:
    return [r for r in rows if r.state != "undone"]


def shown(history: list[tuple[str, str]], reply: str) -> list[str]:
    """Fingerprints of what the app shows after a request: its conversation, the reply."""
    messages = [*st_messages(history), {"role": "assistant", "content": reply}]
    return [message_fingerprint(messages[i]) for i in conversation_indices(messages)]


def private_text_in(rows: list[records.MessageRow], *texts: str) -> bool:
    dump = json.dumps([(r.content, r.raw, r.speaker) for r in rows])
    return any(text in dump for text in texts)


def test_a_write_off_exchange_carried_on_is_never_stored_shown_or_exported(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    history = [("user", "We set out from Riverrun at dawn.")]
    send(proxy, up, "w", history, "Mira shoulders her pack.")
    history += [("assistant", "Mira shoulders her pack."), ("user", SECRET)]
    off = send(proxy, up, "w", history, SECRET_REPLY, OFF)
    logged = api(proxy, "GET", f"/requests/{off.headers['x-memory-request-id']}")
    assert logged["detail"]["private"] is True  # the log says why, not what was said
    assert "blue stone" not in json.dumps(logged)
    after_off = transcript_of(db, "w")
    private = [r for r in after_off if r.private]
    # Stored, so that the next request knows it; but without a word of it.
    assert [(r.role, r.content, r.raw, r.speaker) for r in private] == [
        ("user", "", {}, None),
        ("assistant", "", {}, None),
    ]
    assert not private_text_in(after_off, "blue stone")

    # SillyTavern keeps the exchange in its history: the next ordinary request sends it.
    history += [("assistant", SECRET_REPLY), ("user", "Where do we camp tonight?")]
    send(proxy, up, "w", history, "By the old mill, if the rain holds off.")
    rows = transcript_of(db, "w")
    assert not [r for r in rows if r.state == "undone"]  # a continuation: nothing taken back
    assert [r.id for r in rows if r.private] == [r.id for r in private]
    assert not private_text_in(rows, "blue stone")
    assert [r.content for r in rows[-2:]] == [
        "Where do we camp tonight?",
        "By the old mill, if the rain holds off.",
    ]
    memories = memories_of(db, "w")
    assert "Where do we camp tonight?" in [m.text for m in memories]  # its own turn is stored
    assert not any("blue stone" in m.text for m in memories)
    assert {s for m in memories for s in m.sources}.isdisjoint(r.id for r in private)

    # The listing shows placeholders; the export carries them without text.
    listing = api(proxy, "GET", "/scopes/w/transcript", params={"raw": "true"})["messages"]
    placeholders = [m for m in listing if m["private"]]
    assert [(m["role"], m["content"], m["raw"]) for m in placeholders] == [
        ("user", "", {}),
        ("assistant", "", {}),
    ]
    exported = api(proxy, "GET", "/scopes/w/export")
    assert "blue stone" not in json.dumps(exported)
    assert sum(bool(m.get("private")) for m in exported["messages"]) == 2

    # Restored elsewhere, the scope still knows the private messages when they come back.
    api(proxy, "POST", "/scopes/copy/import", json=exported)
    history += [("assistant", "By the old mill, if the rain holds off."), ("user", "Good.")]
    send(proxy, up, "copy", history, "Mira nods.")
    copy = transcript_of(db, "copy")
    assert not private_text_in(copy, "blue stone")
    assert not [r for r in copy if r.state == "undone"]

    # A new chat in the scope that asks about it: nothing of it is injected.
    send(proxy, up, "w", [("user", "What is under the blue stone by the well?")], "No idea.")
    assert "spare key" not in json.dumps(up.last["messages"])


def test_the_memory_model_never_reads_a_private_exchange(
    make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path
) -> None:
    replies = {
        "We set out from Riverrun at dawn.": "Mira shoulders her pack.",
        SECRET: SECRET_REPLY,
        "Where do we camp tonight?": "By the old mill.",
    }
    model = MemoryModel(chat=lambda body: replies[body["messages"][-1]["content"]])
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    history: list[tuple[str, str]] = []
    for text, headers in (
        ("We set out from Riverrun at dawn.", {}),
        (SECRET, OFF),
        ("Where do we camp tonight?", {}),
    ):
        history.append(("user", text))
        send(proxy, up, "bg", history, None, headers)
        history.append(("assistant", replies[text]))
    wait_for_jobs(tmp_path / "memory.db")
    assert model.count("facts") == 2  # the two ordinary exchanges were read for facts...
    assert "blue stone" not in json.dumps(model.calls)  # ...and nothing of the private one


def test_swipes_and_edits_of_private_messages_keep_the_transcript_in_line(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    start = [("user", "Tell me about the ferry."), ("assistant", "It leaves at noon.")]
    send(proxy, up, "s", start[:1], "It leaves at noon.")
    history = [*start, ("user", SECRET)]
    send(proxy, up, "s", history, "First private answer.", OFF)
    # A swipe, still private: the first answer is taken back, the second kept private.
    send(proxy, up, "s", history, SECRET_REPLY, OFF)
    rows = transcript_of(db, "s")
    assert [r.fingerprint for r in live(rows)] == shown(history, SECRET_REPLY)
    swiped = [r for r in rows if r.state == "undone"]
    assert [(r.role, r.private) for r in swiped] == [("assistant", True)]
    assert all(r.private for r in live(rows)[-2:])

    # A swipe with memory on: the user's message stays private, the new reply is stored.
    send(proxy, up, "s", history, "The ferryman drinks.")
    rows = transcript_of(db, "s")
    assert [r.fingerprint for r in live(rows)] == shown(history, "The ferryman drinks.")
    assert [(r.private, r.content) for r in live(rows)[-2:]] == [
        (True, ""),
        (False, "The ferryman drinks."),
    ]

    # Swiping back to the private reply and going on: it comes back private.
    history += [("assistant", SECRET_REPLY), ("user", "And then?")]
    send(proxy, up, "s", history, "Then the tide turned.")
    rows = transcript_of(db, "s")
    assert [r.fingerprint for r in live(rows)] == shown(history, "Then the tide turned.")
    assert not private_text_in(rows, "blue stone")

    # An edit of the private message: it and everything after it are taken back.
    edited = [*start, ("user", "Forget that. Which way is north?")]
    send(proxy, up, "s", edited, "Past the ferry.")
    rows = transcript_of(db, "s")
    assert [r.fingerprint for r in live(rows)] == shown(edited, "Past the ferry.")
    assert not any(r.private for r in live(rows))
    assert not private_text_in(rows, "blue stone")
    assert not any("blue stone" in m.text for m in memories_of(db, "s"))


def test_a_write_off_swipe_of_an_ordinary_reply_takes_it_back_and_keeps_the_new_one_private(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    history = [("user", "What did the innkeeper say?")]
    send(proxy, up, "o", history, "That the bridge is out.")
    [reply] = [r for r in transcript_of(db, "o") if r.content == "That the bridge is out."]
    send(proxy, up, "o", history, SECRET_REPLY, OFF)  # the user swipes, memory off
    rows = transcript_of(db, "o")
    assert next(r for r in rows if r.id == reply.id).state == "undone"  # as the app shows
    assert [(r.private, r.content) for r in live(rows)[-1:]] == [(True, "")]
    memories = memories_of(db, "o")
    assert {m.state for m in memories if reply.id in m.sources} == {"retracted"}
    assert not any("blue stone" in m.text for m in memories)


def test_utility_calls_record_nothing_with_or_without_the_header(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    history = [("user", "We reach the gate."), ("assistant", "The guard waves us through.")]
    send(proxy, up, "u", history[:1], "The guard waves us through.")
    before = transcript_of(db, "u")
    memories = memories_of(db, "u")
    summarize = [*st_messages(history), {"role": "system", "content": SUMMARIZE}]
    task = [
        {
            "role": "user",
            "content": "### Task:\nGenerate a concise title.\n<chat_history>\nUSER: We reach"
            " the gate.\n</chat_history>",
        }
    ]
    for messages in (summarize, task):
        for headers in ({}, OFF):
            send(proxy, up, "u", history, "A summary.", headers, messages=messages)
    assert transcript_of(db, "u") == before  # not part of the chat: no trace at all
    assert memories_of(db, "u") == memories
    # Whereas a chat turn with the header leaves its (private) trace.
    send(proxy, up, "u", [*history, ("user", SECRET)], SECRET_REPLY, OFF)
    added = transcript_of(db, "u")[len(before) :]
    assert [(r.role, r.private, r.content) for r in added] == [
        ("user", True, ""),
        ("assistant", True, ""),
    ]


def test_a_private_reply_the_app_sends_back_changed_stays_private(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    start = [("user", "We make camp."), ("assistant", "Mira lights the fire.")]
    send(proxy, up, "c", start[:1], "Mira lights the fire.")
    history = [*start, ("user", SECRET)]
    send(proxy, up, "c", history, "*She nods. The blue stone", OFF)
    # SillyTavern fixes the markdown of the reply it shows, and "Continue" asks for more
    # its default way: a system nudge after the reply (a utility call: nothing stored).
    fixed = ("assistant", "*She nods. The blue stone*")
    nudge = {"role": "system", "content": "[Continue the following message.]"}
    continued = [*st_messages([*history, fixed]), nudge]
    send(proxy, up, "c", [], " stays hidden.", OFF, messages=continued)
    history += [("assistant", fixed[1] + " stays hidden."), ("user", "Shall we sleep?")]
    send(proxy, up, "c", history, "Mira yawns.")
    history += [("assistant", "Mira yawns."), ("user", "Good night.")]
    send(proxy, up, "c", history, "Sleep well.")
    rows = transcript_of(db, "c")
    assert not private_text_in(rows, "blue stone", "stays hidden")
    assert not any("blue stone" in m.text for m in memories_of(db, "c"))
    assert [(r.private, r.content) for r in live(rows)][-6:] == [
        (True, ""),
        (True, ""),
        (False, "Shall we sleep?"),
        (False, "Mira yawns."),
        (False, "Good night."),
        (False, "Sleep well."),
    ]


def test_the_exchange_is_private_not_what_came_before_it(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    # The first message of a new chat, private: the greeting is the character's.
    send(proxy, up, "g", [("user", SECRET)], SECRET_REPLY, OFF)
    rows = transcript_of(db, "g")
    assert [(r.content, r.private) for r in rows] == [(GREETING, False), ("", True), ("", True)]
    # A turn whose reply never reached the store (the upstream failed), then a private
    # one: errs on the side of forgetting the user's messages since the last reply.
    history = [("user", SECRET), ("assistant", SECRET_REPLY), ("user", "Lost message.")]
    history += [("user", "Another secret.")]
    send(proxy, up, "g", history, "Hidden too.", OFF)
    assert not private_text_in(transcript_of(db, "g"), "Lost message", "Another secret")


def test_the_request_log_keeps_no_private_text(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    history = [("user", SECRET)]
    send(proxy, up, "l", history, SECRET_REPLY, OFF)
    # Later ordinary requests carry the private exchange: their entries keep no messages.
    history += [("assistant", SECRET_REPLY), ("user", "Onward.")]
    later = send(proxy, up, "l", history, "Onward we go.")
    # A utility call with the header stores nothing, and logs no text either.
    summarize = [*st_messages(history), {"role": "system", "content": SUMMARIZE}]
    utility = send(proxy, up, "l", history, "A summary.", OFF, messages=summarize)
    for response in (later, utility):
        entry = api(proxy, "GET", f"/requests/{response.headers['x-memory-request-id']}")
        assert entry["detail"]["private"] is True
        assert "blue stone" not in json.dumps(entry)
        assert "messages" not in entry["detail"] and entry["detail"]["reply"] is None


def test_an_x_memory_write_value_it_cannot_mean_is_refused(
    proxy: RunningServer, up: FakeUpstream, tmp_path: Path
) -> None:
    body = st_body([("user", SECRET)])
    url = f"{proxy.url}/s/h/v1/chat/completions"
    refused = httpx.post(url, json=body, headers={"X-Memory-Write": "of"}, timeout=30)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "X-Memory-Write"
    assert up.chat_requests == []  # nothing went upstream, nothing stored
    send(proxy, up, "h", [("user", SECRET)], SECRET_REPLY, {"X-Memory-Write": "Disabled"})
    assert not private_text_in(transcript_of(tmp_path / "memory.db", "h"), "blue stone")


def test_a_store_written_before_private_messages_opens_and_carries_on(
    make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "memory.db"
    old = [m for m in MIGRATIONS if migration_number(m) < 6]
    history = [("user", "Hello, Mira."), ("assistant", "Hello, traveler.")]
    conn = open_connection(db)
    try:  # as the version before migration 6 left the file: a chat already stored
        for migration in old:
            conn.execute("BEGIN IMMEDIATE")
            migration(conn)
            conn.execute(f"PRAGMA user_version = {migration_number(migration)}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        conn.execute(
            "INSERT INTO scopes (owner, name, created_at, last_seen) VALUES ('', 'old', 1, 1)"
        )
        stored = [{"role": "assistant", "content": GREETING}] + [
            {"role": role, "content": text} for role, text in history
        ]
        for seq, message in enumerate(stored, start=1):
            conn.execute(
                "INSERT INTO messages (scope_id, seq, role, content, raw, fingerprint, seen_at,"
                " thread) VALUES (1, ?, ?, ?, ?, ?, 1, 1)",
                (
                    seq,
                    message["role"],
                    message["content"],
                    json.dumps(message),
                    message_fingerprint(message),
                ),
            )
        assert schema_version(conn) == 5
    finally:
        conn.close()

    proxy = make_proxy(
        {"local": up},
        memory={"enabled": True, "database": str(db)},
        embeddings={"backend": "upstream", "upstream": "local", "model": "fake-model"},
    )
    history.append(("user", SECRET))
    send(proxy, up, "old", history, SECRET_REPLY, OFF)
    history += [("assistant", SECRET_REPLY), ("user", "Shall we go?")]
    send(proxy, up, "old", history, "We shall.")
    rows = transcript_of(db, "old")
    assert [r.fingerprint for r in live(rows)] == shown(history, "We shall.")
    assert [r.private for r in rows] == [False, False, False, True, True, False, False]
    assert not private_text_in(rows, "blue stone")
    conn = open_connection(db)
    try:
        assert schema_version(conn) == latest_version() >= 6
    finally:
        conn.close()
