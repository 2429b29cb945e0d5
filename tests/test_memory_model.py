"""Memory with the real embedding model (all-MiniLM-L6-v2, offline): it loads in the
background while requests pass through, then recall finds meaning, not just words."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import MakeProxy
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import filler, memory_block, st_body, wait_until

pytestmark = pytest.mark.model


def test_answers_at_once_then_semantic_recall(make_proxy: MakeProxy, tmp_path: Path) -> None:
    with FakeUpstream(flavor="llamacpp", context_window=2048) as up:
        proxy = make_proxy(
            {"local": up}, memory={"enabled": True, "database": str(tmp_path / "memory.db")}
        )
        headers = {"X-Memory-Scope": "semantic"}
        turns = [filler(i) for i in range(60)]
        turns[4] = "My sister Ana keeps the lighthouse out on Vessel Rock."
        history: list[tuple[str, str]] = []
        for text in turns:
            history.append(("user", text))
            up.enqueue(Reply(text="Mira nods."))
            response = httpx.post(
                f"{proxy.url}/v1/chat/completions", json=st_body(history), headers=headers
            )
            assert response.status_code == 200
            history.append(("assistant", "Mira nods."))
        # Whether the model was still loading or not, every turn was answered (warming
        # up itself is shown deterministically in test_memory_chat).

        question = "Which coastal building does my sibling look after?"  # no shared words
        history.append(("user", question))

        def recalled() -> bool:
            response = httpx.post(
                f"{proxy.url}/v1/chat/completions",
                json=st_body(history),
                headers={**headers, "X-Memory-Write": "off"},
            )
            return "x-memory-error" not in response.headers and "Vessel Rock" in (
                memory_block(up.last["messages"]) or ""
            )

        wait_until(recalled, 120, "the model to load and the turns to be embedded")
