"""Shared fixtures: a fake upstream on a real socket, and the proxy under real uvicorn."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.app import build_app
from proxy.settings import load_settings
from tests.fakes.servers import RunningServer, run_server
from tests.fakes.upstream import FakeUpstream

MakeProxy = Callable[..., RunningServer]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own configuration or data directory."""
    for key in list(os.environ):
        if key.startswith("MNEMOPROXY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream on 127.0.0.1."""
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[MakeProxy]:
    """Start the proxy under a real uvicorn server: `make_proxy(upstreams, **sections)`.

    `upstreams` maps names to a FakeUpstream, a base URL or an upstream settings dict;
    keyword arguments are settings sections (`server={...}`, `memory={...}`). Memory and
    background LLM work are off unless a test turns them on.
    """
    with contextlib.ExitStack() as stack:

        def make(upstreams: dict[str, Any], **sections: Any) -> RunningServer:
            overrides: dict[str, Any] = {
                "upstreams": {name: _upstream_cfg(u) for name, u in upstreams.items()},
                "memory": {"enabled": False, "database": str(tmp_path / "memory.db")},
                # Background LLM jobs would send their own chat requests to the fake
                # upstream; tests that are about them turn them on.
                "background": {"llm": False},
            }
            for section, values in sections.items():
                if isinstance(values, dict) and isinstance(overrides.get(section), dict):
                    overrides[section] = {**overrides[section], **values}
                else:
                    overrides[section] = values
            app = build_app(load_settings(None, overrides))
            return stack.enter_context(run_server(app))

        yield make


def _upstream_cfg(value: Any) -> dict[str, Any]:
    if isinstance(value, FakeUpstream):
        return {"base_url": value.base_url}
    if isinstance(value, str):
        return {"base_url": value}
    if isinstance(value, dict) and isinstance(value.get("base_url"), FakeUpstream):
        return {**value, "base_url": value["base_url"].base_url}
    return value


MakeClient = Callable[..., openai.OpenAI]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """The official openai client pointed at the proxy: `make_client(server, scope=None)`.

    Clients are closed after the test, so no socket is left for the garbage collector.
    """
    clients: list[openai.OpenAI] = []

    def make(server: RunningServer, scope: str | None = None, **kwargs: Any) -> openai.OpenAI:
        base = f"{server.url}/s/{scope}/v1" if scope else f"{server.url}/v1"
        kwargs.setdefault("api_key", "undefined")  # what SillyTavern sends with no key set
        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=base, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
