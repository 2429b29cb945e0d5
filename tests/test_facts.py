"""Facts from each exchange, through the real proxy and a scripted memory model on the
fake upstream: sources and importance, repeats merged, contradictions superseding,
bad answers retried then given up visibly, undo reaching the facts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.memory import facts as facts_module
from proxy.memory import jobs, records
from tests.background_helpers import (
    MemoryModel,
    all_jobs,
    background_proxy,
    last_user_request,
    memories,
    prompt_of,
    read,
    say,
    scope_id,
    wait_for_jobs,
    write,
)
from tests.conftest import MakeProxy
from tests.fakes.upstream import FakeUpstream
from tests.memory_helpers import filler, memory_block, st_body, wait_until

DAY1, DAY2, DAY3 = "2026-03-01T10:00:00Z", "2026-03-08T10:00:00Z", "2026-03-15T10:00:00Z"


def fact(text: str, importance: float = 0.5, sources: list[int] | None = None, **more: Any):
    return {
        "text": text,
        "importance": importance,
        "from": sources or [1],
        "same_as": more.get("same_as"),
        "updates": more.get("updates"),
    }


def number_of(body: dict[str, Any], start: str) -> int:
    """The number the extraction prompt gave the new message that starts with `start`."""
    match = re.search(rf"\[(\d+)\] [\d-]+ {re.escape(start)}", prompt_of(body))
    assert match, f"no new message starting {start!r} in the prompt"
    return int(match.group(1))


def label_of(body: dict[str, Any], text: str) -> str:
    """The label (K1, K2...) the extraction prompt gave a known fact."""
    match = re.search(rf"(K\d+)\. {re.escape(text)}", prompt_of(body))
    assert match, f"{text!r} is not among the known facts shown to the model"
    return match.group(1)


@pytest.fixture
def up() -> Any:
    with FakeUpstream() as fake:
        yield fake


def test_each_exchange_gives_facts_with_sources_importance_names_and_dates(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def facts(body: dict[str, Any]) -> dict[str, Any]:
        if "Tom: My sister" not in prompt_of(body):
            return {"facts": []}
        tom, mira = number_of(body, "Tom: My sister"), number_of(body, "Mira: A light")
        return {
            "facts": [
                fact("Tom's sister Ana keeps a lighthouse on Vessel Rock.", 0.8, [tom]),
                fact("Mira thinks Ana must love storms.", 0.3, [mira]),
            ]
        }

    model = MemoryModel(chat=lambda body: "A lighthouse keeper! She must love storms.", facts=facts)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    say(proxy, [], "My sister Ana keeps a lighthouse on Vessel Rock.", now=DAY1)
    wait_for_jobs(tmp_path / "memory.db")

    db = tmp_path / "memory.db"
    scope = scope_id(db)
    transcript = read(db, records.get_messages, scope)
    user_msg, reply_msg = transcript[-2], transcript[-1]
    found = {m.text: m for m in memories(db, scope, "fact")}
    ana = found["Tom's sister Ana keeps a lighthouse on Vessel Rock."]
    assert ana.importance == pytest.approx(0.8) and ana.sources == (user_msg.id,)
    assert found["Mira thinks Ana must love storms."].sources == (reply_msg.id,)
    assert ana.at == user_msg.seen_at  # dated by what it came from, not by the job
    assert ana.speaker is None and "Tom" in ana.text  # self-contained, with names
    wait_until(lambda: memories(db, scope, "fact")[0].embedded, what="the facts' vectors")

    # The model was asked with the speakers' names and dates, and a JSON schema.
    [body] = model.calls["facts"]
    prompt = prompt_of(body)
    assert re.search(r"\[\d\] 2026-03-01 Tom: My sister Ana keeps a lighthouse", prompt)
    assert re.search(r"\[\d\] 2026-03-01 Mira: A lighthouse keeper!", prompt)
    assert "Mira" in body["messages"][0]["content"] and "Tom" in body["messages"][0]["content"]
    assert body["response_format"]["json_schema"]["name"] == "facts"
    assert body["model"] == "fake-model"  # the conversation's own model by default
    assert "mnemoproxy_background_llm_calls_total 1" in httpx.get(f"{proxy.url}/metrics").text


def test_a_fact_that_left_the_window_is_recalled_with_its_importance(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def facts(body: dict[str, Any]) -> dict[str, Any]:
        if "Tom: My sister" not in prompt_of(body):
            return {"facts": []}
        return {"facts": [fact("Tom's sister Ana keeps a lighthouse on Vessel Rock.", 0.9)]}

    with FakeUpstream(flavor="llamacpp", context_window=2048) as up:
        up.responder = MemoryModel(facts=facts)
        proxy = background_proxy(make_proxy, up, tmp_path, background={"summary": False})
        history = say(proxy, [], "My sister Ana keeps a lighthouse on Vessel Rock.")
        for i in range(60):  # more than the window holds
            history = say(proxy, history, filler(i))
        wait_for_jobs(tmp_path / "memory.db")
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json=st_body([*history, ("user", "What does my sister do?")]),
            headers={"x-memory-scope": "chat"},
            timeout=30,
        )
        assert int(response.headers["x-memory-trimmed"]) > 0
        block = memory_block(last_user_request(up)["messages"])
        assert block is not None and "] Tom's sister Ana keeps a lighthouse" in block
        # The request log says why it was chosen: its importance counted.
        entry = read(
            tmp_path / "memory.db", jobs.get_request, None, response.headers["x-memory-request-id"]
        )
        injected = {m["text"]: m for m in entry.detail["injected"]}
        ana = injected["Tom's sister Ana keeps a lighthouse on Vessel Rock."]
        assert ana["kind"] == "fact"
        assert ana["components"]["importance"] == pytest.approx(0.9)


def test_a_repeat_is_merged_and_a_contradiction_supersedes_keeping_both_dates(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def facts(body: dict[str, Any]) -> dict[str, Any]:
        prompt = prompt_of(body).split("New messages:")[-1]
        if "moved to Berlin" in prompt:
            old = label_of(body, "Tom lives in Paris.")
            return {"facts": [fact("Tom lives in Berlin.", 0.7, updates=old)]}
        if "still live in Paris" in prompt:
            old = label_of(body, "Tom lives in Paris.")
            return {"facts": [fact("Tom lives in Paris.", 0.9, same_as=old)]}
        if "I live in Paris" in prompt:
            return {"facts": [fact("Tom lives in Paris.", 0.6, [number_of(body, "Tom: I")])]}
        return {"facts": []}

    model = MemoryModel(facts=facts)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I live in Paris, near the river.", now=DAY1)
    wait_for_jobs(db)
    history = say(proxy, history, "Yes, I still live in Paris, I love it.", now=DAY2)
    wait_for_jobs(db)
    scope = scope_id(db)
    [paris] = memories(db, scope, "fact")
    user_ids = [m.id for m in read(db, records.get_messages, scope) if m.role == "user"]
    assert paris.sources == tuple(user_ids)  # merged: one fact, both messages
    assert paris.importance == pytest.approx(0.9)

    say(proxy, history, "Big news: I moved to Berlin last week, Paris is over.", now=DAY3)
    wait_for_jobs(db)
    [berlin] = memories(db, scope, "fact")
    assert berlin.text == "Tom lives in Berlin."
    [old] = memories(db, scope, "fact", states=("superseded",))
    assert old.id == paris.id and old.superseded_by == berlin.id
    assert old.at == paris.at < berlin.at  # when it was said...
    assert old.meta["superseded_at"] == berlin.at  # ...and when it stopped being true

    # The newer fact deleted by hand (it was wrong): the older one is true again.
    url = f"{proxy.url}/memory/scopes/chat/memories/{berlin.id}"
    assert httpx.delete(url).status_code == 204
    [back] = memories(db, scope, "fact")
    assert back.id == paris.id and back.superseded_by is None and "superseded_at" not in back.meta


def test_bad_json_is_read_leniently_or_retried_once_with_the_error_shown(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    answers = iter(
        [
            # Prose, a code fence, Python quotes, a trailing comma: read as it is.
            "Sure! Here you go:\n```json\n{'facts': [{'text': 'Tom owns a grey cat.',"
            " 'importance': 0.4, 'from': [1],}]}\n```\nAnything else?",
            # Not JSON at all: asked once more, with the error...
            "Tom owns a grey dog, I think.",
            # ...and the second answer is good.
            '{"facts": [{"text": "Tom owns a grey dog.", "importance": 7, "from": ["1"]}]}',
        ]
    )
    model = MemoryModel(facts=lambda body: next(answers))
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "My grey cat sleeps all day.")
    wait_for_jobs(db)
    say(proxy, history, "And my grey dog barks at it.")
    jobs = wait_for_jobs(db)
    scope = scope_id(db)
    texts = {m.text: m.importance for m in memories(db, scope, "fact")}
    assert texts == {"Tom owns a grey cat.": 0.4, "Tom owns a grey dog.": pytest.approx(0.7)}
    assert model.count("facts") == 3
    retry = model.calls["facts"][2]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "Tom owns a grey dog, I think."}
    assert "could not be used" in retry[-1]["content"] and "JSON" in retry[-1]["content"]
    assert all(j.state == "done" and j.last_error is None for j in jobs)


def test_unusable_answers_fail_the_job_visibly_and_keep_the_raw_turns(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    model = MemoryModel(facts=lambda body: "I cannot answer in JSON, sorry.")
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "My grey cat is called Pebble.")
    [job] = [j for j in wait_for_jobs(db) if j.kind == "extract"]
    assert job.state == "failed" and job.attempts == 1
    assert "not usable" in job.last_error and "I cannot answer in JSON" in job.last_error
    assert model.count("facts") == 2  # the answer, and one retry; no more
    scope = scope_id(db)
    assert not memories(db, scope, "fact")
    assert any("Pebble" in m.text for m in memories(db, scope, "turn"))  # nothing lost

    # The queue goes on: the next exchange is tried again.
    model.facts = lambda body: {"facts": [fact("Tom's cat is called Pebble.", 0.5)]}
    say(proxy, history, "Pebble is grey and fat.")
    wait_for_jobs(db)
    assert [m.text for m in memories(db, scope, "fact")] == ["Tom's cat is called Pebble."]


def test_undoing_a_message_retracts_its_facts_and_restores_what_they_superseded(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def facts(body: dict[str, Any]) -> dict[str, Any]:
        prompt = prompt_of(body).split("New messages:")[-1]
        if "Mira: I will come to Berlin" in prompt:
            old = label_of(body, "Mira plans to stay in Paris.")
            n = number_of(body, "Mira: I will come")
            return {"facts": [fact("Mira plans to move to Berlin.", 0.6, [n], updates=old)]}
        if "Mira: I will stay in Paris" in prompt:
            n = number_of(body, "Mira: I will stay")
            return {"facts": [fact("Mira plans to stay in Paris.", 0.6, [n])]}
        return {"facts": []}

    replies = iter(["I will stay in Paris.", "I will come to Berlin with you.", "Hmm, maybe."])
    model = MemoryModel(facts=facts, chat=lambda body: next(replies))
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "Will you leave Paris?")
    wait_for_jobs(db)
    history = say(proxy, history, "I am moving to Berlin. Will you come?")
    wait_for_jobs(db)
    scope = scope_id(db)
    assert [m.text for m in memories(db, scope, "fact")] == ["Mira plans to move to Berlin."]

    # A swipe: the same request again, so its reply is undone and replaced.
    body = st_body(history[:-1])
    httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers={"x-memory-scope": "chat"})
    wait_for_jobs(db)
    [moving] = memories(db, scope, "fact", states=("retracted",))
    assert moving.text == "Mira plans to move to Berlin."
    [paris] = memories(db, scope, "fact")
    assert paris.text == "Mira plans to stay in Paris." and paris.superseded_by is None
    wait_until(lambda: memories(db, scope, "fact")[0].embedded, what="the restored fact's vector")


def test_a_scope_can_turn_background_llm_work_off(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    model = MemoryModel(facts=lambda body: {"facts": [fact("Tom likes tea.")]})
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I like tea.", scope="quiet")
    wait_for_jobs(db)
    assert model.count("facts") == 1
    write(db, records.update_scope_settings, scope_id(db, "quiet"), {"llm": False})
    say(proxy, history, "I like green tea best.", scope="quiet")
    wait_for_jobs(db)
    assert model.count("facts") == 1
    assert [j.kind for j in all_jobs(db)].count("extract") == 1


def test_an_edit_far_back_is_extracted_again_in_bounded_batches(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # Editing the first message re-appends the whole rest of the chat; its extraction
    # goes in prompts of at most MAX_BATCH_MESSAGES new messages, none squeezed.
    sizes: list[int] = []

    def facts(body: dict[str, Any]) -> dict[str, Any]:
        new = prompt_of(body).split("New messages:")[-1]
        sizes.append(len(re.findall(r"^\[\d+\] ", new, flags=re.MULTILINE)))
        return {"facts": []}

    up.responder = MemoryModel(facts=facts, chat=lambda body: "Mira listens.")
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history: list[tuple[str, str]] = []
    for i in range(10):
        history = say(proxy, history, filler(i))
    wait_for_jobs(db)
    sizes.clear()
    edited = [("user", "Turn 0, said differently."), *history[1:]]
    say(proxy, edited, "And now?")
    wait_for_jobs(db)
    assert sum(sizes) == len(edited) + 2  # the edited chat, the new turn and its reply
    assert max(sizes) <= facts_module.MAX_BATCH_MESSAGES
