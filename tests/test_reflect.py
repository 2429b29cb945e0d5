"""Reflection, through the real proxy and a scripted memory model: insights come when
the importance of new facts adds up, rest on their facts (sources and ids), and go
when everything they rest on is undone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.memory import records
from tests.background_helpers import (
    MemoryModel,
    background_proxy,
    memories,
    prompt_of,
    read,
    say,
    scope_id,
    wait_for_jobs,
)
from tests.conftest import MakeProxy
from tests.fakes.upstream import FakeUpstream
from tests.memory_helpers import st_body

FACTS = {
    "I bake bread every morning.": "Tom bakes bread every morning.",
    "I sell my bread at the market.": "Tom sells bread at the market.",
    "My oven is old.": "Tom's oven is old.",
}


def facts(body: dict[str, Any]) -> dict[str, Any]:
    """One fact per user message of the table, importance 0.8, from the user message."""
    new = prompt_of(body).split("New messages:")[-1]
    out = []
    for said, fact in FACTS.items():
        match = re.search(rf"\[(\d+)\] [\d-]+ Tom: {re.escape(said)}", new)
        if match:
            out.append(
                {"text": fact, "importance": 0.8, "from": [int(match.group(1))],
                 "same_as": None, "updates": None}
            )  # fmt: skip
    return {"facts": out}


def label(body: dict[str, Any], text: str) -> str:
    match = re.search(rf"(F\d+)\. {re.escape(text)}", prompt_of(body))
    assert match, f"{text!r} not shown to the model"
    return match.group(1)


@pytest.fixture
def up() -> Any:
    with FakeUpstream() as fake:
        yield fake


def test_insights_come_when_new_facts_weigh_enough_and_rest_on_them(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def insights(body: dict[str, Any]) -> dict[str, Any]:
        bakes = label(body, "Tom bakes bread every morning.")
        sells = label(body, "Tom sells bread at the market.")
        return {
            "insights": [
                {
                    "text": "Tom makes his living as a baker.",
                    "importance": 0.9,
                    "because": [bakes, sells],
                }
            ]
        }

    model = MemoryModel(facts=facts, insights=insights)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path, background={"reflect_threshold": 1.5})
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I bake bread every morning.")
    wait_for_jobs(db)
    assert model.count("insights") == 0  # 0.8 of 1.5
    history = say(proxy, history, "I sell my bread at the market.")
    wait_for_jobs(db)
    assert model.count("insights") == 1  # 1.6

    scope = scope_id(db)
    fact_rows = {m.text: m for m in memories(db, scope, "fact")}
    [insight] = memories(db, scope, "insight")
    assert insight.text == "Tom makes his living as a baker."
    assert insight.importance == pytest.approx(0.9)
    bakes, sells = (
        fact_rows["Tom bakes bread every morning."],
        fact_rows["Tom sells bread at the market."],
    )
    assert insight.meta["facts"] == [bakes.id, sells.id]
    assert insight.sources == tuple(sorted(bakes.sources + sells.sources))
    assert all("reflected" in f.meta for f in fact_rows.values())

    # The facts already reflected on do not count again: one more is not enough.
    say(proxy, history, "My oven is old.")
    wait_for_jobs(db)
    assert model.count("insights") == 1
    assert model.calls["insights"][0]["response_format"]["json_schema"]["name"] == "insights"


def test_undo_retracts_the_facts_and_insights_resting_only_on_undone_messages(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def insights(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "insights": [
                {
                    "text": "Tom's market days depend on an old oven.",
                    "importance": 0.6,
                    "because": [label(body, "Tom's oven is old.")],
                },
                {
                    "text": "Bread is Tom's whole life.",
                    "importance": 0.6,
                    "because": [
                        label(body, "Tom bakes bread every morning."),
                        label(body, "Tom's oven is old."),
                    ],
                },
            ]
        }

    model = MemoryModel(facts=facts, insights=insights)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path, background={"reflect_threshold": 1.5})
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I bake bread every morning.")
    history = say(proxy, history, "My oven is old.")
    wait_for_jobs(db)
    scope = scope_id(db)
    assert len(memories(db, scope, "insight")) == 2

    # Delete-below-and-resend: the user message about the oven (and its reply) are
    # undone and a different one is sent.
    edited = [*history[:-2], ("user", "I love rye.")]
    httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json=st_body(edited),
        headers={"x-memory-scope": "chat"},
        timeout=30,
    )
    wait_for_jobs(db)
    undone = [m for m in read(db, records.get_messages, scope, include_undone=True)]
    assert any(m.state == "undone" and m.content == "My oven is old." for m in undone)
    assert [m.text for m in memories(db, scope, "fact")] == ["Tom bakes bread every morning."]
    assert [m.text for m in memories(db, scope, "insight")] == ["Bread is Tom's whole life."]
    [gone] = memories(db, scope, "insight", states=("retracted",))
    assert gone.text == "Tom's market days depend on an old oven."
