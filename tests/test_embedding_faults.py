"""An embedding upstream that fails or hangs after start costs a chat request its vector
search only: the history is still trimmed, keyword recall still works, and the header
says what happened."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import filler, st_body


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream(flavor="llamacpp", context_window=1024) as fake:
        yield fake


@pytest.fixture
def proxy(make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path) -> RunningServer:
    return make_proxy(
        {"local": up},
        memory={"enabled": True, "database": str(tmp_path / "memory.db")},
        embeddings={"backend": "upstream", "upstream": "local", "model": "fake-model"},
    )


def send(proxy: RunningServer, up: FakeUpstream, history: list[tuple[str, str]]) -> httpx.Response:
    up.enqueue(Reply(text="Mira nods."))
    response = httpx.post(f"{proxy.url}/s/e/v1/chat/completions", json=st_body(history), timeout=30)
    assert response.status_code == 200, response.text
    return response


def long_chat(proxy: RunningServer, up: FakeUpstream) -> list[tuple[str, str]]:
    """A chat whose first turn (a code word) is stored, then more than the window holds,
    ending with a question about it."""
    history = [("user", "The code word is PELICAN.")]
    send(proxy, up, history)
    for i in range(40):
        history += [("assistant", "Mira nods."), ("user", filler(i))]
    return [*history, ("assistant", "Mira nods."), ("user", "What was the code word, PELICAN?")]


def test_a_hanging_embedding_upstream_leaves_the_chat_trimmed_and_answered(
    proxy: RunningServer, up: FakeUpstream
) -> None:
    history = long_chat(proxy, up)
    up.embeddings_open.clear()  # /embeddings now hangs
    try:
        started = time.monotonic()
        response = send(proxy, up, history)
        assert time.monotonic() - started < 10
    finally:
        up.embeddings_open.set()
    assert "query embedding took over" in response.headers["x-memory-error"]
    assert int(response.headers["x-memory-trimmed"]) > 0  # still within the window
    sent = str(up.last["messages"])
    assert "PELICAN." in sent and "The code word is PELICAN." in sent  # recalled by keyword


def test_a_failing_embedding_upstream_leaves_the_chat_trimmed_and_answered(
    proxy: RunningServer, up: FakeUpstream
) -> None:
    history = long_chat(proxy, up)
    up.embedding_dim = 7  # its answers no longer fit the store: every embedding fails
    response = send(proxy, up, history)
    assert "embedding upstream" in response.headers["x-memory-error"]
    assert int(response.headers["x-memory-trimmed"]) > 0
    assert "The code word is PELICAN." in str(up.last["messages"])
