"""The memory API (/memory) over HTTP against the real proxy under a real server: every
endpoint, what it changes on the chat path (caches dropped at once), its errors in
OpenAI's envelope, and the isolation between keys (404, never 403)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.memory import jobs
from proxy.routes.auth import owner_of
from proxy.settings import Settings
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import GREETING, filler, memory_block, open_store, st_body, wait_until

EMBED = {"backend": "upstream", "upstream": "local", "model": "fake-model"}
FACT = "My sister Ana keeps a lighthouse on Vessel Rock."


def memory_proxy(
    make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path, **sections: Any
) -> RunningServer:
    sections.setdefault("embeddings", EMBED)
    if "background" in Settings.model_fields:  # no LLM jobs: they would take the replies
        sections.setdefault("background", {"llm": False})
    memory = {"enabled": True, "database": str(tmp_path / "memory.db")}
    memory.update(sections.pop("memory", {}))
    return make_proxy({"local": up}, memory=memory, **sections)


def api(
    proxy: RunningServer, method: str, path: str, key: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{proxy.url}/memory{path}", headers=headers, timeout=30, **kwargs)


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def chat(
    proxy: RunningServer,
    up: FakeUpstream,
    scope: str,
    history: list[tuple[str, str]],
    reply: str = "Mira nods.",
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    up.enqueue(Reply(text=reply))
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = httpx.post(
        f"{proxy.url}/s/{scope}/v1/chat/completions",
        json=st_body(history),
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def play(
    proxy: RunningServer,
    up: FakeUpstream,
    scope: str,
    turns: list[str],
    history: list[tuple[str, str]] | None = None,
    key: str | None = None,
) -> list[tuple[str, str]]:
    history = list(history or [])
    for text in turns:
        history.append(("user", text))
        reply = f"Mira answers turn {len(history)}."
        chat(proxy, up, scope, history, reply, key=key)
        history.append(("assistant", reply))
    return history


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def up() -> Any:
    with FakeUpstream() as fake:
        yield fake


# -- scopes and settings ------------------------------------------------------------------


def test_scopes_list_show_rename_settings_and_delete(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    history = play(proxy, up, "campaign", ["Hello Mira.", FACT])
    scopes = ok(api(proxy, "GET", "/scopes"))["scopes"]
    assert [s["name"] for s in scopes] == ["campaign"]
    scope = ok(api(proxy, "GET", "/scopes/campaign"))
    assert {**scope, "jobs": None} == {**scopes[0], "jobs": None}  # jobs may have moved on
    assert scope["label"] == "Mira" and scope["owner"] == ""
    assert scope["messages"] == {"active": 5, "partial": 0, "undone": 0}  # greeting + 2 turns
    assert scope["memories"]["active"] == 5 and scope["threads"] == 1
    assert set(scope["jobs"]) == {"pending", "running", "failed"}
    assert scope["settings"] == {"enabled": True, "style": True, "llm": True}
    assert scope["last_seen"] >= scope["created_at"] > time.time() - 60

    # Memory off for the scope: the next turn is neither helped nor stored.
    assert ok(api(proxy, "PATCH", "/scopes/campaign/settings", json={"enabled": False})) == {
        "enabled": False,
        "style": True,
        "llm": True,
    }
    history.append(("user", "Nothing to remember here."))
    response = chat(proxy, up, "campaign", history)
    assert "x-memory-injected" not in response.headers
    assert ok(api(proxy, "GET", "/scopes/campaign"))["messages"]["active"] == 5
    both = ok(
        api(proxy, "PATCH", "/scopes/campaign/settings", json={"enabled": True, "llm": False})
    )
    assert both == {"enabled": True, "style": True, "llm": False}
    assert ok(api(proxy, "GET", "/scopes/campaign/settings")) == both
    chat(proxy, up, "campaign", history)
    assert ok(api(proxy, "GET", "/scopes/campaign"))["messages"]["active"] == 7

    # Rename: the chat continues the same memory under its new name.
    renamed = ok(api(proxy, "PATCH", "/scopes/campaign", json={"name": "saga", "label": "Maps"}))
    assert renamed["name"] == "saga" and renamed["label"] == "Maps"
    error = error_of(api(proxy, "GET", "/scopes/campaign"), 404)
    assert error["message"] == "no scope named 'campaign'" and error["type"] == "not_found_error"
    history.append(("assistant", "Mira nods."))
    history.append(("user", "Where next?"))
    chat(proxy, up, "saga", history)
    saga = ok(api(proxy, "GET", "/scopes/saga"))
    assert saga["messages"]["active"] == 9 and saga["threads"] == 1
    # An app that names its scope itself (Open WebUI's chat id, the automatic name of a
    # character) keeps sending the old name: it still reaches the renamed scope.
    history += [("assistant", "Mira nods."), ("user", "And after that?")]
    assert chat(proxy, up, "campaign", history).headers["x-memory-scope"] == "saga"
    assert ok(api(proxy, "GET", "/scopes/saga"))["messages"]["active"] == 11
    error_of(api(proxy, "GET", "/scopes/campaign"), 404)  # the API names scopes as they are
    ok(api(proxy, "POST", "/scopes", json={"name": "other"}), 201)
    taken = error_of(api(proxy, "PATCH", "/scopes/saga", json={"name": "other"}), 409)
    assert "already exists" in taken["message"]
    assert error_of(api(proxy, "POST", "/scopes", json={"name": "other"}), 409)
    assert error_of(api(proxy, "PATCH", "/scopes/saga", json={"name": "a/b"}), 400)
    # A label left out stays; null or empty removes it.
    assert ok(api(proxy, "PATCH", "/scopes/saga", json={}))["label"] == "Maps"
    assert ok(api(proxy, "PATCH", "/scopes/saga", json={"label": None}))["label"] is None
    ok(api(proxy, "PATCH", "/scopes/saga", json={"label": "Maps"}))
    assert ok(api(proxy, "PATCH", "/scopes/saga", json={"label": ""}))["label"] is None

    # Delete: everything goes, and the chat path does not serve a stale scope.
    ok(api(proxy, "POST", "/scopes/saga/memories", json={"text": "Keep this", "pinned": True}), 201)
    assert api(proxy, "DELETE", "/scopes/saga").status_code == 204
    error_of(api(proxy, "GET", "/scopes/saga"), 404)
    error_of(api(proxy, "DELETE", "/scopes/saga"), 404)
    chat(proxy, up, "saga", [("user", "Hello again.")])
    assert "Keep this" not in str(up.last["messages"])
    fresh = ok(api(proxy, "GET", "/scopes/saga"))
    assert fresh["memories"]["pinned"] == 0 and fresh["messages"]["active"] == 3
    # The old name went with the scope.
    assert chat(proxy, up, "campaign", [("user", "Hi.")]).headers["x-memory-scope"] == "campaign"


def test_bad_input_gets_a_clear_400_in_the_error_envelope(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    ok(api(proxy, "POST", "/scopes", json={"name": "s"}), 201)
    cases = [
        ("PATCH", "/scopes/s/settings", {"json": {"enabled": "maybe"}}, "enabled"),
        ("PATCH", "/scopes/s/settings", {"json": {"colour": True}}, "colour"),
        # Not a boolean: is "no" (or 0, or "false") meant as false? Say so instead.
        ("PATCH", "/scopes/s/settings", {"json": {"enabled": "no"}}, "enabled"),
        ("PATCH", "/scopes/s/settings", {"json": {"enabled": 0}}, "enabled"),
        (
            "POST",
            "/scopes/s/transcript",
            {"json": {"messages": [{"role": "user", "content": "x", "date": True}]}},
            "date",
        ),
        ("POST", "/scopes/s/memories", {"json": {"text": ""}}, "text"),
        ("POST", "/scopes/s/memories", {"json": {"text": "x", "importance": 3}}, "importance"),
        ("POST", "/scopes/s/memories", {"content": b"{not json"}, "not valid JSON"),
        ("POST", "/scopes/s/memories", {"content": b'{"text": NaN}'}, "NaN"),
        (
            "POST",
            "/scopes/s/import",
            {"content": b'{"memories": [{"kind": "note", "text": "x", "meta": {"v": 1e999}}]}'},
            "1e999",
        ),
        ("POST", "/scopes/s/memories", {"content": b'{"text": "\\ud800"}'}, "JSON"),
        ("POST", "/scopes/s/memories", {"content": b""}, "empty"),
        ("GET", "/scopes/s/memories", {"params": {"kind": "dream"}}, "kind"),
        ("GET", "/scopes/s/memories", {"params": {"since": "yesterday"}}, "since"),
        ("GET", "/scopes/s/memories", {"params": {"limit": "0"}}, "limit"),
        ("GET", "/scopes/s/memories/search", {}, "q"),
        ("GET", "/scopes/s/memories/search", {"params": {"q": " \n\t "}}, "q"),
        ("GET", "/scopes/s/transcript", {"params": {"state": "lost"}}, "state"),
        ("PUT", "/scopes/s/scene", {"json": {"weather": "rain"}}, "weather"),
        ("GET", "/scopes/bad%20name", {}, "scope"),
    ]
    for method, path, kwargs, word in cases:
        error = error_of(api(proxy, method, path, **kwargs), 400)
        assert word in error["message"] + str(error["param"]), (path, error)
        assert error["type"] == "invalid_request_error"
    assert error_of(api(proxy, "GET", "/nothing/here"), 404)["type"] == "not_found_error"


# -- transcript -------------------------------------------------------------------------------


def test_transcript_shows_each_message_with_its_state_and_chat(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    history = [("user", "Tell me about the observatory.")]
    chat(proxy, up, "t", history, "It burned down.")
    chat(proxy, up, "t", history, "It still stands.")  # a swipe: the first reply is undone
    history.append(("assistant", "It still stands."))
    history.append(("user", "Tell me a long story."))
    up.enqueue(Reply(chunks=["Once ", "upon ", "a ", "time "] * 10, delay_between=0.1))
    body = st_body(history, stream=True)
    url = f"{proxy.url}/s/t/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        for seen, _ in enumerate(line for line in response.iter_lines() if "content" in line):
            if seen == 3:
                break  # the user stopped the reply: it is kept as partial

    def states() -> dict[str, str]:
        data = ok(api(proxy, "GET", "/scopes/t/transcript"))
        return {m["content"]: m["state"] for m in data["messages"]}

    wait_until(lambda: "partial" in states().values(), what="the partial reply")
    found = states()
    assert found["It burned down."] == "undone"
    assert found["It still stands."] == "active"
    assert found[GREETING] == "active"
    # A new chat in the same scope is a new thread; nothing of the first is undone.
    chat(proxy, up, "t", [("user", "A completely new story begins here.")])
    data = ok(api(proxy, "GET", "/scopes/t/transcript", params={"raw": "true"}))
    threads = {m["content"]: m["thread"] for m in data["messages"]}
    assert threads["A completely new story begins here."] != threads[GREETING]
    first = data["messages"][0]
    assert first["raw"] == {"role": "assistant", "content": GREETING}
    assert first["speaker"] == "Mira" and first["request_id"]
    assert [m["seq"] for m in data["messages"]] == sorted(m["seq"] for m in data["messages"])
    undone = ok(api(proxy, "GET", "/scopes/t/transcript", params={"state": "undone"}))
    assert [m["content"] for m in undone["messages"]] == ["It burned down."]
    assert undone["messages"][0]["undone_at"] is not None
    page = ok(api(proxy, "GET", "/scopes/t/transcript", params={"limit": 2}))
    assert len(page["messages"]) == 2 and page["next_after"] == page["messages"][-1]["seq"]
    rest = ok(api(proxy, "GET", "/scopes/t/transcript", params={"after": page["next_after"]}))
    assert rest["messages"][0]["seq"] > page["next_after"]
    thread = threads[GREETING]
    one = ok(api(proxy, "GET", "/scopes/t/transcript", params={"thread": thread}))
    assert {m["thread"] for m in one["messages"]} == {thread}


# -- memories -----------------------------------------------------------------------------------


def test_memories_list_add_pin_edit_delete_and_retracted_ones_refuse_edits(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    history = [("user", "Tell me about the observatory.")]
    chat(proxy, up, "m", history, "It burned down.")
    chat(proxy, up, "m", history, "It still stands.")  # swipe: "burned down" is retracted
    history.append(("assistant", "It still stands."))

    turns = ok(api(proxy, "GET", "/scopes/m/memories", params={"kind": "turn"}))["memories"]
    assert {m["text"] for m in turns} == {GREETING, history[0][1], "It still stands."}
    assert [m["id"] for m in turns] == sorted((m["id"] for m in turns), reverse=True)
    assert all(m["state"] == "active" and m["kind"] == "turn" for m in turns)
    retracted = ok(api(proxy, "GET", "/scopes/m/memories", params={"state": "retracted"}))
    (gone,) = retracted["memories"]
    assert gone["text"] == "It burned down." and gone["sources"]
    refused = error_of(
        api(proxy, "PATCH", f"/scopes/m/memories/{gone['id']}", json={"text": "x"}), 409
    )
    assert "retracted" in refused["message"] and refused["type"] == "conflict_error"
    error_of(api(proxy, "PATCH", f"/scopes/m/memories/{gone['id']}", json={"pinned": True}), 409)
    everything = ok(api(proxy, "GET", "/scopes/m/memories", params={"state": "all"}))
    assert len(everything["memories"]) == 4

    # A pinned note is shown on every turn.
    note = ok(
        api(proxy, "POST", "/scopes/m/memories", json={"text": "Mira is allergic to cats."}),
        201,
    )
    assert note["kind"] == "note" and not note["pinned"] and note["meta"] == {"source": "manual"}
    pinned = ok(api(proxy, "PATCH", f"/scopes/m/memories/{note['id']}", json={"pinned": True}))
    assert pinned["pinned"]
    history.append(("user", "Shall we go?"))
    chat(proxy, up, "m", history)
    block = memory_block(up.last["messages"]) or ""
    assert "Always keep in mind" in block and "Mira is allergic to cats." in block
    assert ok(api(proxy, "GET", "/scopes/m/memories", params={"pinned": "true"}))["memories"] == [
        pinned
    ]
    notes = ok(api(proxy, "GET", "/scopes/m/memories", params={"kind": "note,fact"}))
    assert [m["id"] for m in notes["memories"]] == [note["id"]]

    # Edit: new text, embedded again (the worker picks it up).
    wait_until(lambda: ok(api(proxy, "GET", f"/scopes/m/memories/{note['id']}"))["embedded"])
    edited = ok(
        api(
            proxy,
            "PATCH",
            f"/scopes/m/memories/{note['id']}",
            json={"text": "Mira is allergic to dogs.", "importance": 0.9},
        )
    )
    assert edited["text"] == "Mira is allergic to dogs." and edited["importance"] == 0.9
    assert not edited["embedded"]
    wait_until(lambda: ok(api(proxy, "GET", f"/scopes/m/memories/{note['id']}"))["embedded"])
    chat(proxy, up, "m", history)
    assert "allergic to dogs" in (memory_block(up.last["messages"]) or "")
    ok(api(proxy, "PATCH", f"/scopes/m/memories/{note['id']}", json={"pinned": False}))
    chat(proxy, up, "m", history)
    assert "- Mira is allergic" not in str(up.last["messages"])  # no longer a pinned note

    # Dates and paging.
    future = ok(api(proxy, "GET", "/scopes/m/memories", params={"since": "2999-01-01"}))
    assert future["memories"] == []
    active = ok(api(proxy, "GET", "/scopes/m/memories"))["memories"]
    since = ok(api(proxy, "GET", "/scopes/m/memories", params={"since": str(time.time() - 600)}))
    assert since["memories"] == active and since["next_before"] is None
    page = ok(api(proxy, "GET", "/scopes/m/memories", params={"limit": 2}))
    assert page["next_before"] == page["memories"][-1]["id"]
    rest = ok(api(proxy, "GET", "/scopes/m/memories", params={"before": page["next_before"]}))
    assert page["memories"] + rest["memories"] == active

    # Delete, and unknown ids.
    assert api(proxy, "DELETE", f"/scopes/m/memories/{note['id']}").status_code == 204
    for method in ("GET", "PATCH", "DELETE"):
        for memory_id in (note["id"], 999999, 99999999999999999999):
            kwargs = {"json": {"pinned": True}} if method == "PATCH" else {}
            response = api(proxy, method, f"/scopes/m/memories/{memory_id}", **kwargs)
            assert error_of(response, 404)["type"] == "not_found_error"
    assert api(proxy, "DELETE", f"/scopes/m/memories/{gone['id']}").status_code == 204


def test_search_is_the_recall_of_the_chat_path_with_scores(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    turns = [filler(i) for i in range(8)]
    turns[2] = FACT
    play(proxy, up, "s", turns)
    wait_until(
        lambda: (
            ok(api(proxy, "GET", "/scopes/s"))["jobs"]["pending"] == 0
            and all(m["embedded"] for m in ok(api(proxy, "GET", "/scopes/s/memories"))["memories"])
        ),
        what="every memory embedded",
    )
    found = ok(api(proxy, "GET", "/scopes/s/memories/search", params={"q": "Ana's lighthouse?"}))
    assert found["mode"] == "hybrid" and found["query"] == "Ana's lighthouse?"
    best = found["results"][0]
    assert best["text"] == FACT and best["speaker"] == "Tom" and best["keyword_rank"] == 0
    assert set(best["components"]) >= {"similarity", "keyword", "recency", "importance"}
    assert best["score"] == max(r["score"] for r in found["results"])
    # The fake embedder gives the same vector for the same text: the memory is embedded
    # as "speaker: text", so that query is its exact neighbour.
    exact = ok(api(proxy, "GET", "/scopes/s/memories/search", params={"q": f"Tom: {FACT}"}))
    assert exact["results"][0]["vector_similarity"] == pytest.approx(1.0, abs=1e-4)
    few = ok(
        api(proxy, "GET", "/scopes/s/memories/search", params={"q": "road weather", "limit": 2})
    )
    assert len(few["results"]) == 2
    # No word in common: only vector neighbours (noise, with the fake embedder).
    noise = api(proxy, "GET", "/scopes/s/memories/search", params={"q": "xylophone quasar"})
    assert all(r["keyword_rank"] is None for r in ok(noise)["results"])
    strict = {"q": "xylophone quasar", "min_score": 5}
    assert ok(api(proxy, "GET", "/scopes/s/memories/search", params=strict))["results"] == []


# -- summary, style, scene -------------------------------------------------------------------------


def test_summary_show_replace_clear_and_history(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    history = play(proxy, up, "sum", ["Hello."])
    assert ok(api(proxy, "GET", "/scopes/sum/summary")) == {"summary": None}
    first = ok(api(proxy, "PUT", "/scopes/sum/summary", json={"text": "They met in Dunmore."}))
    assert first["summary"]["text"] == "They met in Dunmore."
    assert first["summary"]["state"] == "active" and first["summary"]["covers_until_seq"] == 3
    second = ok(api(proxy, "PUT", "/scopes/sum/summary", json={"text": "They sailed north."}))
    assert second["summary"]["covers_until_seq"] == 3
    history.append(("user", "What now?"))
    chat(proxy, up, "sum", history)
    block = memory_block(up.last["messages"]) or ""
    assert "The story so far:" in block and "They sailed north." in block
    assert "Dunmore" not in block
    assert api(proxy, "DELETE", "/scopes/sum/summary").status_code == 204
    assert ok(api(proxy, "GET", "/scopes/sum/summary")) == {"summary": None}
    versions = ok(api(proxy, "GET", "/scopes/sum/summary/history"))["summaries"]
    assert [(v["text"], v["state"]) for v in versions] == [
        ("They sailed north.", "retracted"),
        ("They met in Dunmore.", "archived"),
    ]
    chat(proxy, up, "sum", history)
    assert "sailed north" not in str(up.last["messages"])
    # Cleared already: no error (DELETE is idempotent), and nothing more is retracted.
    assert api(proxy, "DELETE", "/scopes/sum/summary").status_code == 204
    assert len(ok(api(proxy, "GET", "/scopes/sum/summary/history"))["summaries"]) == 2


def test_style_sample_show_replace_switch_off_clear_and_history(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    play(proxy, up, "sty", ["Hello."])
    auto = ok(api(proxy, "GET", "/scopes/sty/style"))["style"]
    assert auto["text"] == GREETING and auto["source"] == "auto" and auto["enabled"]
    manual = ok(api(proxy, "PUT", "/scopes/sty/style", json={"text": "*Mira grins.* Aye."}))
    assert manual["style"]["source"] == "manual" and manual["style"]["message_id"] is None
    ok(api(proxy, "PATCH", "/scopes/sty/settings", json={"style": False}))
    assert not ok(api(proxy, "GET", "/scopes/sty/style"))["style"]["enabled"]
    assert api(proxy, "DELETE", "/scopes/sty/style").status_code == 204
    assert ok(api(proxy, "GET", "/scopes/sty/style")) == {"style": None}
    history = ok(api(proxy, "GET", "/scopes/sty/style/history"))["history"]
    assert [(h["text"], h["source"]) for h in history] == [
        ("*Mira grins.* Aye.", "manual"),
        (GREETING, "auto"),
    ]
    assert all(h["replaced_at"] >= h["updated_at"] for h in history)
    # Cleared already: no error (DELETE is idempotent), and the history is unchanged.
    assert api(proxy, "DELETE", "/scopes/sty/style").status_code == 204
    assert ok(api(proxy, "GET", "/scopes/sty/style/history"))["history"] == history


def test_scene_is_injected_when_set_and_overrides_the_names(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    ok(api(proxy, "POST", "/scopes", json={"name": "sc", "label": "Lighthouse"}), 201)
    assert ok(api(proxy, "GET", "/scopes/sc/scene")) == {}
    scene = {
        "character": "a weathered cartographer",
        "location": "the lighthouse on Vessel Rock",
        "user": "a sailor called Tom",
        "char_name": "Captain Mira",
    }
    assert ok(api(proxy, "PUT", "/scopes/sc/scene", json=scene)) == scene
    chat(proxy, up, "sc", [("user", "Good evening.")])
    block = memory_block(up.last["messages"]) or ""
    assert "Scene:" in block
    assert "Captain Mira: a weathered cartographer" in block
    assert "Where: the lighthouse on Vessel Rock" in block
    assert "between Captain Mira and" in block
    changed = ok(api(proxy, "PATCH", "/scopes/sc/scene", json={"location": None, "user": "Tom"}))
    assert changed == {"character": scene["character"], "user": "Tom", "char_name": "Captain Mira"}
    chat(proxy, up, "sc", [("user", "Good evening.")])
    assert "Vessel Rock" not in (memory_block(up.last["messages"]) or "")
    assert api(proxy, "DELETE", "/scopes/sc/scene").status_code == 204
    assert ok(api(proxy, "GET", "/scopes/sc")).get("scene") == {}
    chat(proxy, up, "sc", [("user", "Good evening.")])
    assert "Scene:" not in (memory_block(up.last["messages"]) or "")


# -- request log -----------------------------------------------------------------------------------


def test_request_log_shows_what_was_sent_injected_and_trimmed(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with FakeUpstream(flavor="llamacpp", context_window=2048) as llama:
        proxy = memory_proxy(make_proxy, llama, tmp_path)
        turns = [filler(i) for i in range(60)]  # more than the window holds
        turns[3] = FACT
        history = play(proxy, llama, "log", turns)
        history.append(("user", "Do you remember where Ana keeps her lighthouse?"))
        response = chat(proxy, llama, "log", history)
        request_id = response.headers["x-memory-request-id"]
        sent = llama.last["messages"]
        entry = ok(api(proxy, "GET", f"/requests/{request_id}"))
        listed = ok(api(proxy, "GET", "/scopes/log/requests", params={"limit": 1}))
        transcript = ok(api(proxy, "GET", "/scopes/log/transcript", params={"limit": 1000}))
    assert entry["scope"] == "log" and entry["model"] == "fake-model"
    detail = entry["detail"]
    assert detail["messages"] == sent  # exactly what the upstream received
    (fact,) = [item for item in detail["injected"] if item["text"] == FACT]
    assert fact["kind"] == "turn" and fact["score"] > 0
    assert set(fact["components"]) >= {"similarity", "keyword", "recency", "importance"}
    by_id = {m["id"]: m["content"] for m in transcript["messages"]}
    assert [by_id[i] for i in fact["source_ids"]] == [FACT]
    assert (
        entry["injected"] == len(detail["injected"]) == int(response.headers["x-memory-injected"])
    )
    assert entry["trimmed"] == len(detail["trimmed"]) == int(response.headers["x-memory-trimmed"])
    assert entry["trimmed"] > 0
    # Trimmed to make room for the block: what went out may even be more than came in.
    assert entry["tokens_sent"] == int(response.headers["x-memory-prompt-tokens"])
    assert entry["tokens_saved"] == max(0, entry["tokens_in"] - entry["tokens_sent"])
    timings = detail["timings"]
    assert timings["prepare_ms"] >= timings["embed_ms"] >= 0
    # Recall's own steps happen inside its lap.
    assert timings["recall_ms"] >= timings["search_ms"] + timings["rows_ms"] + timings["rank_ms"]
    assert detail["reply"]["content"] == "Mira nods."
    assert listed["requests"][0]["id"] == request_id and listed["next_before"] is not None


def test_request_log_retention_and_off_switch(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    ids = [
        chat(proxy, up, "keep", [("user", f"Message {i}.")]).headers["x-memory-request-id"]
        for i in range(4)
    ]
    listed = ok(api(proxy, "GET", "/scopes/keep/requests"))["requests"]
    assert [r["id"] for r in listed] == ids[::-1]
    # A second proxy on the same file applies its retention when it starts.
    second = memory_proxy(make_proxy, up, tmp_path, request_log={"keep_per_scope": 2})
    kept = ok(api(second, "GET", "/scopes/keep/requests"))["requests"]
    assert [r["id"] for r in kept] == ids[:1:-1]
    error_of(api(second, "GET", f"/requests/{ids[0]}"), 404)
    quiet = memory_proxy(
        make_proxy,
        up,
        tmp_path,
        memory={"database": str(tmp_path / "quiet.db")},
        request_log={"enabled": False},
    )
    request_id = chat(quiet, up, "q", [("user", "Hi.")]).headers["x-memory-request-id"]
    assert ok(api(quiet, "GET", "/scopes/q/requests"))["requests"] == []
    error_of(api(quiet, "GET", f"/requests/{request_id}"), 404)


def test_request_log_pages_through_entries_logged_at_the_same_time(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    ids = [
        chat(proxy, up, "same", [("user", f"Message {i}.")]).headers["x-memory-request-id"]
        for i in range(5)
    ]
    # Three logged at the same time (an older log dated by X-Memory-Now, a coarse clock),
    # between an older and a newer one: newest first, ties in the order logged.
    base = time.time()
    dates = [base - 2, base - 1, base - 1, base - 1, base]
    store = open_store(tmp_path / "memory.db")  # the proxy's own SQLite, not the stdlib's
    try:
        store.write_sync(
            lambda conn: conn.executemany(
                "UPDATE requests SET created_at = ? WHERE id = ?",
                list(zip(dates, ids, strict=True)),
            )
        )
    finally:
        store.close_sync()
    newest_first = ids[::-1]

    def pages(limit: int, **first: Any) -> list[list[str]]:
        out, params = [], {"limit": limit, **first}
        while True:
            page = ok(api(proxy, "GET", "/scopes/same/requests", params=params))
            out.append([r["id"] for r in page["requests"]])
            if page["next_cursor"] is None:
                assert page["next_before"] is None
                return out
            assert page["next_before"] == page["requests"][-1]["created_at"]
            params = {"limit": limit, "cursor": page["next_cursor"]}

    assert pages(1) == [[i] for i in newest_first]
    assert pages(2) == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    assert pages(3) == [newest_first[:3], newest_first[3:]]
    # The old float `before` still works: the entries older than it.
    assert pages(10, before=base - 0.5) == [newest_first[1:]]
    assert pages(10, before=base - 1) == [newest_first[4:]]
    bad = ["soon", "nan:1", f"{base}:-1", f"{base}:{2**70}", "1_000:1"]
    for params in [{"cursor": c} for c in bad]:
        assert error_of(api(proxy, "GET", "/scopes/same/requests", params=params), 400)[
            "param"
        ] == ("cursor")
    both = {"cursor": f"{base}:1", "before": base}
    error_of(api(proxy, "GET", "/scopes/same/requests", params=both), 400)


def test_request_log_dates_entries_by_the_clock_not_by_x_memory_now(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    started = time.time()
    past = {"X-Memory-Now": "2020-01-01T00:00:00Z"}
    request_id = chat(proxy, up, "past", [("user", "Hi.")], headers=past).headers[
        "x-memory-request-id"
    ]
    entry = ok(api(proxy, "GET", f"/requests/{request_id}"))
    assert started <= entry["created_at"] <= time.time()
    assert entry["detail"]["now"] == 1577836800.0  # the request's own "now"
    # Retention (at start) goes by the clock: a request handled just now stays.
    second = memory_proxy(make_proxy, up, tmp_path)
    kept = ok(api(second, "GET", "/scopes/past/requests"))["requests"]
    assert [r["id"] for r in kept] == [request_id]


def test_request_log_lists_the_pinned_notes_it_injected(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    ok(api(proxy, "POST", "/scopes", json={"name": "pin"}), 201)
    note = ok(
        api(
            proxy,
            "POST",
            "/scopes/pin/memories",
            json={"text": "Mira is allergic to cats.", "pinned": True},
        ),
        201,
    )
    response = chat(proxy, up, "pin", [("user", "Shall we go?")])
    assert "Mira is allergic to cats." in (memory_block(up.last["messages"]) or "")
    entry = ok(api(proxy, "GET", f"/requests/{response.headers['x-memory-request-id']}"))
    injected = entry["detail"]["injected"]
    notes = [item for item in injected if item.get("section") == "notes"]
    assert notes == [
        {
            "memory_id": note["id"],
            "kind": "note",
            "section": "notes",
            "pinned": True,
            "text": "Mira is allergic to cats.",
        }
    ]
    assert entry["injected"] == len(injected) == int(response.headers["x-memory-injected"])


# -- export and import ---------------------------------------------------------------------------


def test_export_import_round_trip_is_exact_and_the_chat_continues(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    history = [("user", "Tell me about the observatory.")]
    chat(proxy, up, "src", history, "It burned down.")
    chat(proxy, up, "src", history, "It still stands.")
    history.append(("assistant", "It still stands."))
    history = play(proxy, up, "src", ["Let us go there.", FACT], history=history)
    ok(api(proxy, "POST", "/scopes/src/memories", json={"text": "A note", "pinned": True}), 201)
    ok(api(proxy, "PUT", "/scopes/src/summary", json={"text": "First summary."}))
    ok(api(proxy, "PUT", "/scopes/src/summary", json={"text": "Second summary."}))
    ok(api(proxy, "PUT", "/scopes/src/style", json={"text": "Aye, captain."}))
    ok(api(proxy, "PUT", "/scopes/src/scene", json={"location": "the observatory"}))
    ok(api(proxy, "PATCH", "/scopes/src/settings", json={"style": False}))

    exported = ok(api(proxy, "GET", "/scopes/src/export"))
    assert exported["format"] == "mnemoproxy.scope" and exported["version"] == 1
    states = {m["state"] for m in exported["memories"]}
    assert states == {"active", "retracted"}
    assert {m["state"] for m in exported["messages"]} == {"active", "undone"}
    result = ok(api(proxy, "POST", "/scopes/copy/import", json=exported))
    assert result["messages"] == len(exported["messages"]) and result["kept_existing"] == []
    again = ok(api(proxy, "GET", "/scopes/copy/export"))
    assert again["scope"].pop("name") == "copy"
    assert exported["scope"].pop("name") == "src"
    assert again == exported

    # The copy is a working memory: the chat continues it, without a new thread.
    history.append(("user", "And then?"))
    chat(proxy, up, "copy", history)
    copy = ok(api(proxy, "GET", "/scopes/copy"))
    assert copy["threads"] == 1 and copy["messages"]["active"] == len(history) + 2
    assert "A note" in (memory_block(up.last["messages"]) or "")

    # Into a scope with messages: refused, unless appended (as further chats).
    error = error_of(api(proxy, "POST", "/scopes/copy/import", json=exported), 409)
    assert "append" in error["message"]
    appended = ok(
        api(proxy, "POST", "/scopes/copy/import", params={"append": "true"}, json=exported)
    )
    assert appended["kept_existing"] == ["summary", "style"]
    after = ok(api(proxy, "GET", "/scopes/copy"))
    assert after["threads"] == 2
    assert after["messages"]["active"] == copy["messages"]["active"] * 2 - 2


def test_a_document_of_notes_only_is_not_imported_twice_unless_appended(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    ok(api(proxy, "POST", "/scopes", json={"name": "card"}), 201)
    ok(
        api(
            proxy,
            "POST",
            "/scopes/card/memories",
            json={"text": "Mira fears ships.", "pinned": True},
        ),
        201,
    )
    notes_only = ok(api(proxy, "GET", "/scopes/card/export"))
    assert notes_only["messages"] == []
    ok(api(proxy, "POST", "/scopes/twice/import", json=notes_only))
    error = error_of(api(proxy, "POST", "/scopes/twice/import", json=notes_only), 409)
    assert "memories" in error["message"] and "append" in error["message"]
    listed = ok(api(proxy, "GET", "/scopes/twice/memories"))["memories"]
    assert [m["text"] for m in listed] == ["Mira fears ships."]  # not doubled


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"version": 2}, "version"),
        ({"format": "other"}, "format"),
        ({"messages": [{"seq": 1, "role": "user", "content": "a"}] * 2}, "twice"),
        ({"memories": [{"kind": "turn", "text": "a", "sources": [7]}]}, "sources"),
        ({"memories": [{"kind": "dream", "text": "a"}]}, "kind"),
        ({"memories": [{"kind": "fact", "text": "a", "superseded_by": 9}]}, "superseded"),
        (
            {"memories": [{"ref": 1, "kind": "fact", "text": "a", "superseded_by": 1}]},
            "superseded by itself",
        ),
        (
            {
                "memories": [
                    {"ref": 1, "kind": "fact", "text": "a", "superseded_by": 2},
                    {"ref": 2, "kind": "fact", "text": "b", "superseded_by": 1},
                ]
            },
            "superseded by itself",
        ),
        ({"messages": [{"seq": 1, "role": "wizard", "content": "a"}]}, "messages.0.role"),
        ({"scope": {"settings": {"enabled": "no"}}}, "scope.settings.enabled"),
        ({"scope": {"settings": {"enabled": 0}}}, "scope.settings.enabled"),
        ({"scope": {"settings": {"scene": {"location": 5}}}}, "scope.settings.scene.location"),
        ({"style": {"text": "a", "message_seq": 4}}, "message_seq"),
        ({"messages": "none"}, "messages"),
        ({"memories": [{"kind": "note", "text": "  "}]}, "memories.0.text"),
        ({"summaries": [{"text": "a"}, {"text": "b", "state": "active"}]}, "active summaries"),
    ],
)
def test_bad_scope_documents_are_refused_with_400(
    change: dict[str, Any], word: str, up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    document = {"format": "mnemoproxy.scope", "version": 1, **change}
    error = error_of(api(proxy, "POST", "/scopes/doc/import", json=document), 400)
    assert word in error["message"] + str(error["param"])
    # Nothing of a refused import is left behind, not even the scope it would have made.
    error_of(api(proxy, "GET", "/scopes/doc"), 404)
    chat = {"messages": [{"role": "user", "content": "Hi."}], "thread": 5}
    error_of(api(proxy, "POST", "/scopes/doc/transcript", json=chat), 404)  # no chat 5
    error_of(api(proxy, "GET", "/scopes/doc"), 404)


def test_an_appended_document_whose_seqs_would_pass_the_limit_is_refused(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    hello = {"messages": [{"role": "user", "content": "Hello."}]}
    ok(api(proxy, "POST", "/scopes/s1/transcript", json=hello))
    far = {"messages": [{"seq": 2**53, "role": "user", "content": "far away"}]}
    appended = api(proxy, "POST", "/scopes/s1/import", params={"append": "true"}, json=far)
    error = error_of(appended, 400)
    assert "past 9007199254740992" in error["message"]
    stored = ok(api(proxy, "GET", "/scopes/s1/transcript"))["messages"]
    assert [m["content"] for m in stored] == ["Hello."]  # nothing of it written
    # Into an empty scope it fits, and exports to a document that imports again.
    ok(api(proxy, "POST", "/scopes/s2/import", json=far))
    exported = ok(api(proxy, "GET", "/scopes/s2/export"))
    assert [m["seq"] for m in exported["messages"]] == [2**53]
    ok(api(proxy, "POST", "/scopes/s3/import", json=exported))


def test_concurrent_imports_into_one_scope_one_wins_the_others_are_refused(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    messages = [{"role": "user", "content": f"Line {i}."} for i in range(1, 2001)]
    document = {"format": "mnemoproxy.scope", "version": 1, "messages": messages}
    with ThreadPoolExecutor(6) as pool:
        sent = [
            pool.submit(api, proxy, "POST", "/scopes/race1/import", json=document) for _ in range(6)
        ]
        statuses = sorted(f.result().status_code for f in sent)
    assert statuses == [200] + [409] * 5
    scope = ok(api(proxy, "GET", "/scopes/race1"))
    assert scope["messages"]["active"] == 2000 and scope["threads"] == 1


def test_imported_settings_take_effect_and_unknown_ones_are_dropped(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    settings = {"enabled": False, "scene": {"location": "the harbour"}, "from_the_future": 5}
    document = {"format": "mnemoproxy.scope", "version": 1, "scope": {"settings": settings}}
    ok(api(proxy, "POST", "/scopes/doc/import", json=document))
    scope = ok(api(proxy, "GET", "/scopes/doc"))
    assert scope["settings"] == {"enabled": False, "style": True, "llm": True}
    assert scope["scene"]["location"] == "the harbour"
    exported = ok(api(proxy, "GET", "/scopes/doc/export"))["scope"]["settings"]
    assert exported == {"enabled": False, "scene": {"location": "the harbour"}}
    # Memory is off in this scope: the chat passes through with nothing injected.
    chat(proxy, up, "doc", [("user", "Where are we?")])
    assert memory_block(up.last["messages"]) is None


# -- keys ---------------------------------------------------------------------------------


def test_a_key_cannot_see_change_or_delete_another_keys_scope(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    keys = {"keys": ["key-alice", "key-bob"], "admin_keys": ["key-admin"]}
    proxy = memory_proxy(make_proxy, up, tmp_path, auth=keys)
    alice, bob, admin = "key-alice", "key-bob", "key-admin"
    request_id = chat(proxy, up, "diary", [("user", FACT)], key=alice).headers[
        "x-memory-request-id"
    ]
    chat(proxy, up, "shared", [("user", "Alice's shared scope.")], key=alice)
    chat(proxy, up, "shared", [("user", "Bob's shared scope.")], key=bob)
    note = ok(api(proxy, "POST", "/scopes/diary/memories", alice, json={"text": "secret"}), 201)

    assert [s["name"] for s in ok(api(proxy, "GET", "/scopes", bob))["scopes"]] == ["shared"]
    missing = error_of(api(proxy, "GET", "/scopes/no-such-scope", bob), 404)["message"]
    hidden = error_of(api(proxy, "GET", "/scopes/diary", bob), 404)["message"]
    assert hidden == missing.replace("no-such-scope", "diary")  # nothing tells them apart
    attempts = [
        ("PATCH", "/scopes/diary", {"json": {"label": "mine"}}),
        ("DELETE", "/scopes/diary", {}),
        ("PATCH", "/scopes/diary/settings", {"json": {"enabled": False}}),
        ("PUT", "/scopes/diary/scene", {"json": {"location": "x"}}),
        ("GET", "/scopes/diary/transcript", {}),
        ("GET", "/scopes/diary/memories", {}),
        ("GET", "/scopes/diary/memories/search", {"params": {"q": "lighthouse"}}),
        ("POST", "/scopes/diary/memories", {"json": {"text": "x"}}),
        ("GET", "/scopes/diary/export", {}),
        ("GET", "/scopes/diary/requests", {}),
        ("PUT", "/scopes/diary/summary", {"json": {"text": "x"}}),
        ("DELETE", "/scopes/diary/style", {}),
        ("GET", "/scopes/diary", {"params": {"owner": owner_of(alice)}}),
        ("GET", f"/requests/{request_id}", {}),
        # Guessing a memory id through one's own scope:
        ("GET", f"/scopes/shared/memories/{note['id']}", {}),
        ("PATCH", f"/scopes/shared/memories/{note['id']}", {"json": {"text": "gotcha"}}),
        ("DELETE", f"/scopes/shared/memories/{note['id']}", {}),
    ]
    for method, path, kwargs in attempts:
        assert api(proxy, method, path, bob, **kwargs).status_code == 404, (method, path)
    search = api(proxy, "GET", "/scopes/shared/memories/search", bob, params={"q": "lighthouse"})
    assert all("lighthouse" not in r["text"] for r in ok(search)["results"])
    assert "Bob's" in str(ok(api(proxy, "GET", "/scopes/shared/transcript", bob)))
    assert "Alice's" not in str(ok(api(proxy, "GET", "/scopes/shared/transcript", bob)))
    # Nothing of Alice's changed.
    kept = ok(api(proxy, "GET", f"/scopes/diary/memories/{note['id']}", alice))
    assert {**kept, "embedded": None} == {**note, "embedded": None}
    assert ok(api(proxy, "GET", "/scopes/diary", alice))["label"] != "mine"
    assert ok(api(proxy, "GET", f"/requests/{request_id}", alice))["scope"] == "diary"

    # The admin sees everyone's, and names the owner to act on one.
    everyone = ok(api(proxy, "GET", "/scopes", admin))["scopes"]
    assert sorted((s["name"], s["owner"]) for s in everyone) == sorted(
        [
            ("diary", owner_of(alice)),
            ("shared", owner_of(alice)),
            ("shared", owner_of(bob)),
        ]
    )
    # Asked without an owner, it is told whose scope of that name there is.
    hint = error_of(api(proxy, "GET", "/scopes/diary", admin), 404)["message"]
    assert owner_of(alice) in hint and "?owner=" in hint
    as_alice = {"owner": owner_of(alice)}
    assert ok(api(proxy, "GET", "/scopes/diary", admin, params=as_alice))["name"] == "diary"
    assert ok(api(proxy, "GET", f"/requests/{request_id}", admin))["owner"] == owner_of(alice)
    only_bob = ok(api(proxy, "GET", "/scopes", admin, params={"owner": owner_of(bob)}))
    assert [s["owner"] for s in only_bob["scopes"]] == [owner_of(bob)]
    assert error_of(api(proxy, "GET", "/scopes"), 401)["type"] == "authentication_error"
    error_of(api(proxy, "GET", "/scopes", "wrong-key"), 401)


# -- switched off, metrics -----------------------------------------------------------------


def test_memory_api_says_503_when_memory_is_off(up: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy({"local": up})
    error = error_of(api(proxy, "GET", "/scopes"), 503)
    assert "memory is switched off" in error["message"]
    document = ok(api(proxy, "GET", "/openapi.json"))
    assert document["openapi"].startswith("3.1") and "/scopes/{scope}/memories" in document["paths"]
    # The base path says where that description is, rather than 404 (with or without "/").
    assert ok(api(proxy, "GET", "", follow_redirects=True))["openapi"] == "/memory/openapi.json"


def test_metrics_show_job_queue_depth_and_failures(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)

    def metric(name: str) -> float:
        text = httpx.get(f"{proxy.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(f"mnemoproxy_{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics:\n{text}")

    assert metric("jobs_pending") == 0 and metric("jobs_failed") == 0
    chat(proxy, up, "met", [("user", "Hello.")])
    up.embedding_dim = 8  # the embedder now fails: its model said 16
    ok(api(proxy, "POST", "/scopes/met/memories", json={"text": "to embed"}), 201)
    wait_until(lambda: metric("worker_failures") >= 1, what="a worker failure")
    wait_until(lambda: metric("jobs_pending") >= 1, what="the queued job in the gauge")
    store = open_store(tmp_path / "memory.db")
    try:
        job = store.write_sync(jobs.enqueue, "embed", {}, None, time.time())
        store.write_sync(jobs.claim, ["embed"], time.time() + 3600, 100)
        store.write_sync(jobs.fail, job, "gave up", time.time())
    finally:
        store.close_sync()
    wait_until(lambda: metric("jobs_failed") == 1, what="the failed job in the gauge")
    for name in ("tokens_in_total", "tokens_saved_total", "memories_injected_total"):
        assert metric(name) >= 0
    assert 'mnemoproxy_requests_total{route="/v1/chat/completions",status="200"}' in (
        httpx.get(f"{proxy.url}/metrics").text
    )


def test_an_unexpected_error_is_a_500_envelope_and_the_connection_stays_usable(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    chat(proxy, up, "mira", [("user", "Hello.")])
    wait_until(  # the turn is written after the reply: let it land first
        lambda: any(
            m["content"] == "Mira nods."
            for m in ok(api(proxy, "GET", "/scopes/mira/transcript"))["messages"]
        ),
        what="the turn to be stored",
    )
    # A damaged row (written behind the proxy's back) breaks listing the scopes. Written
    # through the proxy's own SQLite: two SQLite libraries in one process do not see
    # each other's file locks, and one can corrupt the file under the other.
    store = open_store(tmp_path / "memory.db")
    try:
        store.write_sync(
            lambda conn: conn.execute("UPDATE scopes SET settings = '[1]' WHERE name = 'mira'")
        )
    finally:
        store.close_sync()
    host, port = proxy.url.removeprefix("http://").split(":")
    request = f"GET /memory/scopes HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        first = _read_response(sock)
        assert first.startswith(b"HTTP/1.1 500 ")
        body = json.loads(first.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["message"] == "internal error in mnemoproxy; see its log"
        assert b"Traceback" not in first
        # The same kept-alive connection answers the next request.
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_a_lone_surrogate_in_a_message_does_not_cost_the_turn(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # JSON allows "\ud83d" alone (a client that cut an emoji in half sends one); no
    # UTF-8 text can hold it, so it is stored as U+FFFD, and the turn is kept.
    proxy = memory_proxy(make_proxy, up, tmp_path)
    up.enqueue(Reply(text="Mira smiles."))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Look \ud83d!"}]}
    response = httpx.post(
        f"{proxy.url}/s/cut/v1/chat/completions",
        content=json.dumps(body).encode(),  # ensure_ascii: the escape, as a browser sends it
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200 and "x-memory-error" not in response.headers

    def contents() -> list[str]:
        return [m["content"] for m in ok(api(proxy, "GET", "/scopes/cut/transcript"))["messages"]]

    wait_until(lambda: contents() == ["Look \ufffd!", "Mira smiles."], what="the turn")


def test_a_system_message_after_the_users_message_is_still_a_turn(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # SillyTavern sends post-history instructions (and an author's note at depth 0, a
    # group's nudge) after the history; only a system instruction after the last
    # reply, with no new user message, is the app's own utility call.
    proxy = memory_proxy(make_proxy, up, tmp_path)
    after = {"role": "system", "content": "[Post-History Instructions: stay in character.]"}

    def send(history: list[tuple[str, str]], reply: str, tail: dict[str, str]) -> None:
        up.enqueue(Reply(text=reply))
        body = st_body(history)
        body["messages"].append(tail)
        response = httpx.post(f"{proxy.url}/s/phi/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 200 and "x-memory-error" not in response.headers

    def active() -> list[str]:
        messages = ok(api(proxy, "GET", "/scopes/phi/transcript"))["messages"]
        return [m["content"] for m in messages if m["state"] == "active"]

    send([("user", "P1")], "R1", after)
    send([("user", "P1"), ("assistant", "R1"), ("user", "P2")], "R2", after)
    wait_until(lambda: active()[-4:] == ["P1", "R1", "P2", "R2"], what="both turns")
    summarize = {"role": "system", "content": "[Pause your roleplay. Summarize the story.]"}
    history = [("user", "P1"), ("assistant", "R1"), ("user", "P2"), ("assistant", "R2")]
    send(history, "A summary of the story.", summarize)  # read memory, write nothing
    send([*history, ("user", "P3")], "R3", after)
    wait_until(lambda: "R3" in active(), what="the third turn")
    assert active()[-6:] == ["P1", "R1", "P2", "R2", "P3", "R3"]
