"""When background LLM work runs, and where: after the reply, in a free slot only, giving
way to a user's request at once; on the configured memory model; retried with backoff
when the upstream fails, then given up with the error kept."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.settings import SettingsError, load_settings
from tests.background_helpers import (
    MemoryModel,
    background_proxy,
    job_kind,
    memories,
    say,
    scope_id,
    wait_for_jobs,
)
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, RecordedRequest, Reply
from tests.memory_helpers import st_body, wait_until

GOOD = {"facts": [{"text": "Tom has a boat.", "importance": 0.5, "from": [1]}]}


@pytest.fixture
def up() -> Any:
    with FakeUpstream() as fake:
        yield fake


def stream_ttfb(proxy: RunningServer, history: list[tuple[str, str]], text: str) -> float:
    """Send a streamed turn; return the seconds until its first byte of content."""
    body = st_body([*history, ("user", text)], stream=True)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{proxy.url}/v1/chat/completions",
        json=body,
        headers={"x-memory-scope": "chat"},
        timeout=30,
    ) as response:
        first = None
        for chunk in response.iter_bytes():
            if first is None and chunk:
                first = time.monotonic() - started
    assert first is not None
    return first


def test_a_users_request_is_served_first_while_a_job_runs_on_a_single_slot_upstream(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    slow = threading.Event()  # the first extraction takes the slow model 10 s

    def facts(body: dict[str, Any]) -> Reply:
        delay = 0.0 if slow.is_set() else 10.0
        slow.set()
        return Reply(json.dumps(GOOD), delay_first=delay)

    model = MemoryModel(facts=facts)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I bought a boat.")
    wait_until(lambda: model.count("facts") == 1, what="the extraction to start")

    ttfb = stream_ttfb(proxy, history, "Shall we sail today?")
    assert ttfb < 2.0  # not behind the 10 s job
    [gave_way] = up.disconnects  # the job's request was cancelled, not waited for
    assert job_kind(gave_way.json) == "facts"

    done = wait_for_jobs(db)
    extract = [j for j in done if j.kind == "extract"]
    assert [j.state for j in extract] == ["done", "done"]
    assert extract[0].attempts == 1 and extract[0].last_error is None  # not a failure
    assert [m.text for m in memories(db, scope_id(db), "fact")] == ["Tom has a boat."]
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert "mnemoproxy_background_llm_preempted_total 1" in metrics


def test_a_queued_job_waits_until_the_users_request_has_finished(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    finished: list[float] = []
    model = MemoryModel(facts=lambda body: GOOD)

    def responder(body: dict[str, Any]) -> Reply:
        if job_kind(body) is None and "long story" in str(body["messages"][-1]["content"]):
            return Reply(" ".join(["word"] * 20), delay_between=0.08)  # ~1.5 s of stream
        return model(body)

    up.responder = responder
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"

    def long_request() -> None:
        body = st_body([("user", "Tell me a long story.")])
        httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json=body,
            headers={"x-memory-scope": "other", "x-memory-write": "off"},
            timeout=30,
        )
        finished.append(time.monotonic())

    reader = threading.Thread(target=long_request)
    reader.start()
    wait_until(lambda: len(up.chat_requests) == 1, what="the long request to start")
    say(proxy, [], "I bought a boat.")  # its extraction is queued now...
    reader.join()
    wait_for_jobs(db)
    [job_request] = [
        r for r in up.chat_requests if job_kind(r.json) == "facts" and "boat" in str(r.json)
    ]
    assert job_request.received_at >= finished[0] - 0.05  # ...and ran only after


def test_with_two_slots_a_job_runs_beside_a_users_request(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    model = MemoryModel(facts=lambda body: GOOD)

    def responder(body: dict[str, Any]) -> Reply:
        if job_kind(body) is None and "long story" in str(body["messages"][-1]["content"]):
            return Reply(" ".join(["word"] * 20), delay_between=0.1)
        return model(body)

    up.responder = responder
    db = tmp_path / "memory.db"
    proxy = make_proxy(
        {"local": {"base_url": up, "slots": 2}},
        memory={"enabled": True, "database": str(db)},
        embeddings={"backend": "upstream", "upstream": "local", "model": "fake-model"},
        background={"llm": True},
    )
    started = time.monotonic()
    reader = threading.Thread(
        target=httpx.post,
        args=(f"{proxy.url}/v1/chat/completions",),
        kwargs={
            "json": st_body([("user", "Tell me a long story.")]),
            "headers": {"x-memory-scope": "other", "x-memory-write": "off"},
            "timeout": 30,
        },
    )
    reader.start()
    wait_until(lambda: any("long story" in str(r.json) for r in up.chat_requests))
    say(proxy, [], "I bought a boat.")
    wait_until(lambda: model.count("facts") == 1, what="the extraction")
    assert reader.is_alive() and time.monotonic() - started < 1.9  # beside the user's
    reader.join()
    wait_for_jobs(db)


def test_the_memory_model_can_be_another_upstream_and_model(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    up.responder = MemoryModel()
    with FakeUpstream(models=["small-model"]) as brain:
        helper = MemoryModel(facts=lambda body: GOOD)
        brain.responder = helper
        proxy = make_proxy(
            {"local": up, "brain": brain},
            memory={"enabled": True, "database": str(tmp_path / "memory.db")},
            embeddings={"backend": "upstream", "upstream": "local", "model": "fake-model"},
            background={"llm": True, "upstream": "brain", "model": "small-model"},
            server={"default_upstream": "local"},
        )
        say(proxy, [], "I bought a boat.")
        wait_for_jobs(tmp_path / "memory.db")
        [asked] = helper.calls["facts"]
        assert asked["model"] == "small-model"
        assert all(job_kind(r.json) is None for r in up.chat_requests)  # none on the chat's
        db = tmp_path / "memory.db"
        assert memories(db, scope_id(db), "fact")


def test_a_failing_upstream_is_retried_with_backoff_then_given_up_visibly(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    model = MemoryModel(facts=lambda body: Reply(status=503))
    up.responder = model
    proxy = background_proxy(
        make_proxy, up, tmp_path, background={"max_attempts": 3, "backoff_seconds": 0.05}
    )
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I bought a boat.")
    [job] = [j for j in wait_for_jobs(db) if j.kind == "extract"]
    assert job.state == "failed" and job.attempts == 3
    assert "answered 503" in job.last_error
    assert model.count("facts") == 3
    # Chat goes on, and so does the queue once the model is back.
    model.facts = lambda body: GOOD
    say(proxy, history, "It is blue.")
    extract = [j for j in wait_for_jobs(db) if j.kind == "extract"]
    assert [j.state for j in extract] == ["failed", "done"]


def test_a_model_that_times_out_is_given_up_with_the_reason(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    up.responder = MemoryModel(facts=lambda body: Reply(json.dumps(GOOD), delay_first=5))
    proxy = background_proxy(
        make_proxy, up, tmp_path, background={"max_attempts": 1, "timeout": 0.3}
    )
    say(proxy, [], "I bought a boat.")
    [job] = [j for j in wait_for_jobs(tmp_path / "memory.db") if j.kind == "extract"]
    assert job.state == "failed" and "did not answer within 0.3 s" in job.last_error


def test_an_upstream_that_refuses_structured_output_is_asked_without_it(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    def facts(body: dict[str, Any]) -> Any:
        if "response_format" in body:
            return Reply(status=400, error_body={"error": {"message": "unknown field"}})
        return GOOD

    model = MemoryModel(facts=facts)
    up.responder = model
    proxy = background_proxy(make_proxy, up, tmp_path)
    db = tmp_path / "memory.db"
    history = say(proxy, [], "I bought a boat.")
    wait_for_jobs(db)
    say(proxy, history, "A blue boat.")
    wait_for_jobs(db)
    asked = model.calls["facts"]
    assert ["response_format" in body for body in asked] == [True, False, False]
    assert memories(db, scope_id(db), "fact")


def test_a_memory_model_upstream_that_is_not_configured_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match=r"background\.upstream 'brain'"):
        load_settings(
            None,
            {
                "upstreams": {"local": {"base_url": "http://127.0.0.1:9/v1"}},
                "background": {"upstream": "brain"},
            },
        )


def four_quick_turns_to_a_slow_model(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, *, delay: float, timeout: float
) -> list[RecordedRequest]:
    """Four turns sent while fact extraction takes `delay` s per request; once every
    extraction is done, the fact requests the upstream received."""
    up.responder = MemoryModel(
        facts=lambda body: Reply(json.dumps({"facts": []}), delay_first=delay)
    )
    proxy = background_proxy(make_proxy, up, tmp_path)
    history: list[tuple[str, str]] = []
    for i in range(4):
        history = say(proxy, history, f"Quick message number {i}.")
    extract = [j for j in wait_for_jobs(tmp_path / "memory.db", timeout) if j.kind == "extract"]
    assert [j.state for j in extract] == ["done"] * 4
    return [r for r in up.chat_requests if job_kind(r.json) == "facts"]


def test_extractions_that_queued_up_behind_a_busy_model_go_together(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # A slow model: every extraction is still running when the next turn arrives.
    facts = four_quick_turns_to_a_slow_model(up, make_proxy, tmp_path, delay=0.6, timeout=15)
    answered = [r.json for r in facts if r.disconnected_at is None]
    # Fewer requests than turns (a turn that comes while a batch waits for the slot
    # goes in the next one), and together they cover every turn.
    assert len(answered) <= 2
    new = " ".join(json.dumps(b["messages"]).split("New messages:")[-1] for b in answered)
    assert all(f"Quick message number {i}." in new for i in range(4))


def test_jobs_taken_along_that_would_not_fit_the_window_go_one_by_one(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with FakeUpstream(flavor="llamacpp", context_window=1200) as up:
        facts = four_quick_turns_to_a_slow_model(up, make_proxy, tmp_path, delay=3, timeout=30)
        answered = [r.json for r in facts if r.disconnected_at is None]
        assert len(answered) >= 2  # not all four in one request
        for request in facts:  # and every one fits the window, cautiously counted
            prompt = "".join(m["content"] for m in request.json["messages"])
            assert len(prompt) / 3 + request.json["max_tokens"] <= 1200
