"""The rolling summary, through the real proxy and a scripted memory model: it updates
when enough messages have left the window, with names and dates, keeps its history,
archives replaced versions as memories, fills the summary slot, and is rebuilt when
what it covered is undone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.memory import manage, records, scope_state, summary
from proxy.memory.records import NewMessage
from proxy.memory.store import Store
from tests.background_helpers import (
    MemoryModel,
    background_proxy,
    last_user_request,
    memories,
    prompt_of,
    read,
    say,
    scope_id,
    wait_for_jobs,
)
from tests.conftest import MakeProxy
from tests.fakes.upstream import FakeUpstream
from tests.memory_helpers import memory_block, st_body

EVERY = 4
WINDOW = 1024
BACKGROUND = {"summary_every": EVERY, "summary_words": 60, "facts": False}


def turn(i: int) -> str:
    """A user turn long enough that a few of them fill the small window."""
    return (
        f"Turn {i}: we reach milestone {i} of the river road, and I note in the logbook the"
        f" colour of the water, the birds, the ferry number {i * 7} and the weather, which"
        " stays grey and mild while the cart creaks along the embankment."
    )


class Summaries:
    """Scripted summary answers: version n names the messages it was given."""

    def __init__(self) -> None:
        self.versions = 0

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        self.versions += 1
        turns = re.findall(r"Tom: Turn (\d+)", prompt_of(body).split("New messages:")[-1])
        return {"summary": f"Version {self.versions}: Tom and Mira passed turns {','.join(turns)}."}


@pytest.fixture
def up() -> Any:
    # A small window: about ten messages fit, the rest must be summarized.
    with FakeUpstream(flavor="llamacpp", context_window=WINDOW) as fake:
        yield fake


def conversation(sent: dict[str, Any]) -> list[str]:
    """The chat messages an upstream request carried, without the memory block."""
    return [
        m["content"]
        for m in sent["messages"]
        if m["role"] in ("user", "assistant") and not m["content"].startswith("[Memory:")
    ]


def test_summary_updates_at_the_threshold_with_history_and_fills_the_summary_slot(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    summaries = Summaries()
    model = MemoryModel(chat=lambda body: "Mira marks the map.", summary=summaries)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path, background=BACKGROUND)
    db = tmp_path / "memory.db"
    history: list[tuple[str, str]] = []
    for i in range(3):
        history = say(proxy, history, turn(i), now=f"2026-04-0{i + 1}T12:00:00Z")
    wait_for_jobs(db)
    assert model.count("summary") == 0  # everything still fits: nothing to summarize
    for i in range(3, 16):
        history = say(proxy, history, turn(i), now=f"2026-04-{i + 1:02d}T12:00:00Z")
        wait_for_jobs(db)
    assert model.count("summary") >= 2
    scope = scope_id(db)

    # Each update got the summary so far and the messages that left the window, with
    # names and dates; never fewer than the threshold.
    first, second = model.calls["summary"][:2]
    assert "Summary so far:\n(nothing yet" in prompt_of(first)
    new_lines = prompt_of(first).split("New messages:\n")[1].split("\n\n")[0].splitlines()
    assert len(new_lines) >= EVERY
    assert re.fullmatch(r"2026-04-01 Mira: \*Mira looks up from the map.*", new_lines[0])
    assert re.fullmatch(r"2026-04-01 Tom: Turn 0: .*", new_lines[1])
    assert re.fullmatch(r"2026-04-01 Mira: Mira marks the map\.", new_lines[2])
    assert "Summary so far:\nVersion 1: " in prompt_of(second)
    assert first["response_format"]["json_schema"]["name"] == "summary"
    for body in model.calls["summary"]:  # each fits the model's window, cautiously counted
        assert len(prompt_of(body)) / 3 + body["max_tokens"] <= WINDOW

    # Every version is kept: one active, the older ones archived, in order.
    versions = list(reversed(read(db, scope_state.list_summaries, scope)))
    assert [v.state for v in versions] == ["archived"] * (len(versions) - 1) + ["active"]
    covers = [v.covers_until_seq for v in versions]
    assert covers == sorted(covers) and len(set(covers)) == len(covers)

    # What the summary covers is out of the window the upstream was sent.
    active = versions[-1]
    covered = read(db, records.get_messages, scope, until_seq=active.covers_until_seq)
    shown = conversation(last_user_request(up))
    assert not any(m.content in shown for m in covered if m.role == "user")

    # Replaced versions are retrievable memories, linked to the messages they added.
    archived = {m.meta["summary_id"]: m for m in memories(db, scope, "summary")}
    assert set(archived) == {v.id for v in versions[:-1]}
    for version in versions[:-1]:
        assert archived[version.id].text == version.text and archived[version.id].sources

    # The summary fills the summary slot of the memory block.
    say(proxy, history, "Where are we now?")
    block = memory_block(last_user_request(up)["messages"])
    assert block is not None and f"The story so far:\n{active.text}" in block


def test_undoing_covered_messages_rolls_the_summary_back_and_rebuilds_it(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    summaries = Summaries()
    model = MemoryModel(chat=lambda body: "Mira marks the map.", summary=summaries)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path, background=BACKGROUND)
    db = tmp_path / "memory.db"
    history: list[tuple[str, str]] = []
    for i in range(14):
        history = say(proxy, history, turn(i))
        wait_for_jobs(db)
    scope = scope_id(db)
    before = read(db, scope_state.list_summaries, scope)
    assert before and "turns 0," in before[-1].text  # the first version covered turn 0..

    # The user edits turn 1 (long out of the window): everything from it is undone.
    edited = [(role, text) for role, text in history]
    edited[2] = ("user", "Turn 1: in fact we took the mountain pass instead of the river.")
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json=st_body([*edited, ("user", turn(14))]),
        headers={"x-memory-scope": "chat"},
        timeout=30,
    )
    assert response.status_code == 200
    # That very reply is not written from the story it takes back.
    sent = prompt_of(last_user_request(up))
    assert not any(v.text in sent for v in before)
    wait_for_jobs(db)

    after = {v.id: v for v in read(db, scope_state.list_summaries, scope)}
    assert all(after[v.id].state == "retracted" for v in before)  # all covered turn 1
    old = {v.id for v in before}
    # Their archived copies are retracted too; archives of the rebuild may follow.
    assert not any(m.meta["summary_id"] in old for m in memories(db, scope, "summary"))
    gone = memories(db, scope, "summary", states=("retracted",))
    assert {m.meta["summary_id"] for m in gone} == old - {before[0].id}  # the active had none
    rebuilt = read(db, scope_state.current_summary, scope)
    assert rebuilt is not None and rebuilt.id not in {v.id for v in before}
    rebuild_prompts = model.calls["summary"][len(before) :]
    assert "(nothing yet" in prompt_of(rebuild_prompts[0])
    assert "mountain pass" in prompt_of(rebuild_prompts[0])


def test_a_window_too_small_for_a_summary_fails_the_job_visibly_without_asking(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with FakeUpstream(flavor="llamacpp", context_window=700) as up:
        model = MemoryModel(chat=lambda body: "Mira marks the map.")
        up.responder = model
        proxy = background_proxy(
            make_proxy, up, tmp_path, background={"summary_every": 2, "facts": False}
        )
        db = tmp_path / "memory.db"
        history: list[tuple[str, str]] = []
        for i in range(8):
            history = say(proxy, history, turn(i))
            wait_for_jobs(db)
        failed = [j for j in wait_for_jobs(db) if j.kind == "summarize"]
        assert failed and failed[0].state == "failed" and failed[0].attempts == 1
        assert "context window of 'local' leaves" in failed[0].last_error
        assert "summary_words" in failed[0].last_error  # and says what to change
        assert model.count("summary") == 0


def test_a_summary_written_by_hand_outlives_a_swipe_and_stays_inside_the_transcript(
    tmp_path: Path,
) -> None:
    store = Store.open_sync(tmp_path / "memory.db")
    try:
        scope = store.write_sync(records.get_or_create_scope, "", "s", None, 1.0)
        rows = [
            NewMessage(role, text, f"fp{i}", 1.0)
            for i, (role, text) in enumerate(
                [("user", "We sailed to Tarn."), ("assistant", "Mira nods.")]
            )
        ]
        ids = store.write_sync(records.append_messages, scope.id, rows, None, 1)
        store.write_sync(scope_state.save_summary, scope.id, "auto", 2, 1.0)
        store.write_sync(manage.set_summary, scope.id, "By hand: Tarn.", now=2.0)
        # A swipe undoes the reply both versions cover: the hand-written one stays.
        store.write_sync(summary.rollback, scope.id, [ids[1]])
        current = store.read_sync(scope_state.current_summary, scope.id)
        assert current is not None and current.text == "By hand: Tarn."
        with pytest.raises(ValueError, match="past the last message"):
            store.write_sync(manage.set_summary, scope.id, "x", now=3.0, covers_until_seq=99)
    finally:
        store.close_sync()
