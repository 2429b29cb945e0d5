"""A turn is never lost: kill the proxy (SIGKILL) right after a reply, restart it, and
the turn is there and gets embedded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from proxy.memory import records
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import open_store, st_body, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def proxy_process(
    chat_url: str, embed_url: str, db: Path, home: Path, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`mnemoproxy start` as its own process, as a user runs it (`settings`: more
    environment, e.g. MNEMOPROXY_SERVER__SHUTDOWN_TIMEOUT="1")."""
    port = _free_port()
    env = {
        **settings,
        **{k: v for k, v in os.environ.items() if not k.startswith("MNEMOPROXY_")},
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "MNEMOPROXY_MEMORY__DATABASE": str(db),
        "MNEMOPROXY_SERVER__DEFAULT_UPSTREAM": "chat",
        "MNEMOPROXY_EMBEDDINGS__BACKEND": "upstream",
        "MNEMOPROXY_EMBEDDINGS__UPSTREAM": "emb",
        "MNEMOPROXY_EMBEDDINGS__MODEL": "fake-model",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "start",
            "--port",
            str(port),
            "--upstream",
            f"chat={chat_url}",
            "--upstream",
            f"emb={embed_url}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url) or process.poll() is not None, 60, "the proxy to start")
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout:
            process.stdout.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _memories(db: Path, scope: str) -> list[records.MemoryRow]:
    store = open_store(db)
    try:
        row = store.read_sync(records.get_scope, "", scope)
        return store.read_sync(records.list_memories, row.id, limit=100) if row else []
    finally:
        store.close_sync()


def test_sigkill_right_after_a_reply_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "memory.db"
    dead_embedder = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens: no vectors yet
    with FakeUpstream() as up:
        up.enqueue(Reply(text="The key is under the third stone."))
        with proxy_process(up.base_url, dead_embedder, db, tmp_path) as (url, process):
            body = st_body([("user", "Where did you hide the key?")], stream=True)
            response = httpx.post(
                f"{url}/v1/chat/completions", json=body, headers={"X-Memory-Scope": "crash"}
            )
            assert response.text.endswith("data: [DONE]\n\n")
            process.send_signal(signal.SIGKILL)  # no shutdown, no flush: a crash
            process.wait(10)
        stored = {m.text: m.embedded for m in _memories(db, "crash")}
        assert stored.get("Where did you hide the key?") is False
        assert stored.get("The key is under the third stone.") is False

        with (
            FakeUpstream() as embedder,
            proxy_process(up.base_url, embedder.base_url, db, tmp_path),
        ):

            def embedded() -> bool:
                return all(m.embedded for m in _memories(db, "crash"))

            wait_until(embedded, 30, "the turn to be embedded after the restart")
    texts = {m.text for m in _memories(db, "crash")}
    assert {"Where did you hide the key?", "The key is under the third stone."} <= texts


def test_a_stop_cuts_a_stalled_stream_after_its_timeout_and_keeps_what_came(
    tmp_path: Path,
) -> None:
    db = tmp_path / "memory.db"
    dead_embedder = f"http://127.0.0.1:{_free_port()}/v1"
    with FakeUpstream() as up:
        # A reply that stalls after its first words (a model server that hangs).
        up.enqueue(Reply(text="The key is under the third stone.", delay_between=30.0))
        timeout = {"MNEMOPROXY_SERVER__SHUTDOWN_TIMEOUT": "1"}
        with proxy_process(up.base_url, dead_embedder, db, tmp_path, **timeout) as (url, proc):
            body = st_body([("user", "Where did you hide the key?")], stream=True)
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers={"X-Memory-Scope": "stop"}
            ) as response:
                first = next(response.iter_text())
                assert "The" in first
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            assert time.monotonic() - started < 15  # not the 30 s the upstream stalls
    texts = {m.text for m in _memories(db, "stop")}
    assert "Where did you hide the key?" in texts
    assert any(t.startswith("The") and "stone" not in t for t in texts)  # partial, kept
