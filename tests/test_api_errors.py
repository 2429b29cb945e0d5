"""Which errors the memory API owns up to: bad input is a 400 naming its field, a bug
(any other exception, a plain ValueError included) is a 500 that says nothing of
itself and leaves the server serving, and clearing a scope's summary, style sample or
scene is idempotent (204 with or without one; 404 only for a missing scope)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.errors import INTERNAL_ERROR
from proxy.memory import exchange, manage
from proxy.memory.rank import Weights
from proxy.memory.store import Store
from proxy.routes import memory_api
from proxy.routes.auth import Identity
from proxy.routes.memory_calls import MemoryService
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream
from tests.test_memory_api import api, error_of, memory_proxy, ok, play


@pytest.fixture
def up() -> Any:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def proxy(up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path) -> RunningServer:
    server = memory_proxy(make_proxy, up, tmp_path)
    play(server, up, "chat", ["Hello Mira."])  # 3 messages: greeting, turn, reply
    ok(api(server, "POST", "/scopes", json={"name": "empty"}), 201)
    return server


def boom(*args: Any, **kwargs: Any) -> Any:
    """A bug, as the memory layer might have one."""
    raise ValueError("boom")


# -- bad input: 400 with its field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "param"),
    [
        ("POST", "/scopes/chat/memories", {"json": {"text": "   "}}, "text"),
        ("PUT", "/scopes/chat/summary", {"json": {"text": " \n"}}, "text"),
        ("PUT", "/scopes/chat/style", {"json": {"text": " "}}, "text"),
        (
            "PUT",
            "/scopes/chat/summary",
            {"json": {"text": "They met.", "covers_until_seq": 99}},
            "covers_until_seq",
        ),
        ("GET", "/scopes/chat/memories/search", {"params": {"q": "  "}}, "q"),
        ("GET", "/scopes/chat/requests", {"params": {"cursor": "1.5:x"}}, "cursor"),
        (
            "POST",
            "/scopes/doc/import",
            {"json": {"messages": [{"role": "user", "content": "a", "seq": 2}] * 2}},
            "messages.1.seq",
        ),
        (
            "POST",
            "/scopes/doc/import",
            {
                "json": {
                    "messages": [{"role": "user", "content": "a"}],
                    "memories": [
                        {"kind": "note", "text": "x"},
                        {"kind": "fact", "text": "y", "sources": [1, 7]},
                    ],
                }
            },
            "memories.1.sources",
        ),
        (
            "POST",
            "/scopes/doc/import",
            {"json": {"memories": [{"kind": "fact", "text": "y", "superseded_by": 1}]}},
            "memories.0.superseded_by",
        ),
    ],
)
def test_bad_input_is_a_400_naming_its_field(
    proxy: RunningServer, method: str, path: str, kwargs: dict[str, Any], param: str
) -> None:
    error = error_of(api(proxy, method, path, **kwargs), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    # A refused import leaves no scope of its making behind.
    error_of(api(proxy, "GET", "/scopes/doc"), 404)


def test_a_file_that_is_no_card_is_still_a_400(proxy: RunningServer) -> None:
    response = api(proxy, "POST", "/scopes/chat/import/card", content=b"\x89PNG\r\n\x1a\njunk")
    assert "not a usable character card" in error_of(response, 400)["message"]


# -- a bug: 500, nothing of it told, the server goes on -------------------------------------


def test_a_value_error_of_a_bug_is_a_500_that_tells_nothing(
    proxy: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(manage, "get_summary", boom)
    with httpx.Client(base_url=f"{proxy.url}/memory", timeout=30) as client:
        response = client.get("/scopes/chat/summary")
        error = error_of(response, 500)
        assert error == {
            "message": INTERNAL_ERROR,
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert "boom" not in response.text and "Traceback" not in response.text
        # The same connection and the server serve on.
        assert client.get("/scopes/chat").status_code == 200
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any("boom" in str(r.exc_info[1]) for r in logged if r.exc_info)


def test_a_bug_where_bad_input_was_checked_is_a_500_not_a_400(
    proxy: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where user input errors are raised (a document's checks, a card's parser), a
    plain ValueError is no longer taken for one."""
    monkeypatch.setattr(exchange, "check_document", boom)
    monkeypatch.setattr(memory_api, "parse_card", boom)
    doc = {"messages": [{"role": "user", "content": "Hello."}]}
    assert error_of(api(proxy, "POST", "/scopes/doc/import", json=doc), 500)["param"] is None
    error_of(api(proxy, "GET", "/scopes/doc"), 404)  # the scope it made is gone again
    error_of(api(proxy, "POST", "/scopes/chat/import/card", content=b'{"name": "Mira"}'), 500)
    assert ok(api(proxy, "GET", "/scopes/chat/summary")) == {"summary": None}


def test_the_direct_mode_answers_a_bug_with_the_same_envelope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's direct mode has no proxy middleware: its routes answer the 500
    themselves, rather than raising into the CLI."""
    monkeypatch.setattr(manage, "get_style", boom)

    async def run() -> None:
        store = Store(tmp_path / "memory.db")
        await store.start()
        service = MemoryService(
            store=store,
            weights=Weights(),
            candidates=20,
            identity=Identity(owner="", admin=True),
        )
        transport = httpx.ASGITransport(app=memory_api.standalone_app(service))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://db") as client:
                created = await client.post("/memory/scopes", json={"name": "s"})
                assert created.status_code == 201, created.text
                response = await client.get("/memory/scopes/s/style")
                assert error_of(response, 500)["message"] == INTERNAL_ERROR
                bad = await client.post("/memory/scopes/s/memories", json={"text": " "})
                assert error_of(bad, 400)["param"] == "text"
        finally:
            await store.close()

    asyncio.run(run())


# -- DELETE of a scope's parts is idempotent ---------------------------------------------------


@pytest.mark.parametrize("part", ["summary", "style", "scene"])
def test_clearing_what_a_scope_has_none_of_is_a_204_every_time(
    proxy: RunningServer, part: str
) -> None:
    for _ in range(2):
        response = api(proxy, "DELETE", f"/scopes/empty/{part}")
        assert response.status_code == 204 and not response.content, response.text
    # Set, cleared, cleared again: the same answer.
    if part == "scene":
        ok(api(proxy, "PUT", "/scopes/empty/scene", json={"location": "the docks"}))
    else:
        ok(api(proxy, "PUT", f"/scopes/empty/{part}", json={"text": "Some text."}))
    for _ in range(2):
        assert api(proxy, "DELETE", f"/scopes/empty/{part}").status_code == 204
    shown = ok(api(proxy, "GET", f"/scopes/empty/{part}"))
    assert shown == ({} if part == "scene" else {part: None})
    # A scope that does not exist is still not found.
    for _ in range(2):
        error = error_of(api(proxy, "DELETE", f"/scopes/no-such/{part}"), 404)
        assert error["param"] == "scope"
