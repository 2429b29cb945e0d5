"""Property-based tests of the memory API from its own OpenAPI document (schemathesis):
whatever it is sent, it never answers 500, and what it answers is what the document says
(status codes, content types, response bodies). One proxy serves every operation; a few
scopes and memories exist, and generated requests are steered to them half of the time so
that the handlers, not only the 404 path, get the random input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.app import build_app
from proxy.routes.memory_api import API_VERSION, OPERATIONS
from proxy.routes.openapi import openapi_document
from proxy.settings import Settings, load_settings
from tests.fakes.servers import RunningServer, run_server
from tests.fakes.upstream import FakeUpstream
from tests.memory_helpers import st_body

SCOPES = ("demo", "notes")


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    with FakeUpstream() as up:
        overrides: dict[str, Any] = {
            "upstreams": {"local": {"base_url": up.base_url}},
            "memory": {"enabled": True, "database": str(tmp / "memory.db")},
            "embeddings": {"backend": "upstream", "upstream": "local", "model": "fake-model"},
        }
        if "background" in Settings.model_fields:
            overrides["background"] = {"llm": False}
        with run_server(build_app(load_settings(None, overrides))) as server:
            for scope in SCOPES:
                history = [("user", "My sister Ana keeps a lighthouse."), ("assistant", "Oh?")]
                httpx.post(f"{server.url}/s/{scope}/v1/chat/completions", json=st_body(history))
                httpx.post(
                    f"{server.url}/memory/scopes/{scope}/memories",
                    json={"text": "Ana fears boats.", "pinned": True},
                )
            yield server


# The document the proxy serves at /memory/openapi.json, built from the same table.
schema = schemathesis.openapi.from_dict(openapi_document(OPERATIONS, version=API_VERSION))
# A chat file (JSON lines) is sent as text.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")


@schemathesis.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Half of the generated names and ids point at things that exist."""
    if not path_parameters:
        return path_parameters
    scope = path_parameters.get("scope")
    if isinstance(scope, str) and len(scope) % 2 == 0:
        path_parameters["scope"] = SCOPES[len(scope) % 4 // 2]
    memory_id = path_parameters.get("memory_id")
    if isinstance(memory_id, int) and memory_id % 2 == 0:
        path_parameters["memory_id"] = memory_id % 8 + 1
    return path_parameters


@schemathesis.hook
def map_query(context: Any, query: dict[str, Any] | None) -> Any:
    """No `owner`: the caller is the admin here, and another owner has no scopes."""
    if query:
        query.pop("owner", None)
    return query


@schema.parametrize()
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_memory_api_never_fails_and_keeps_to_its_document(
    case: Any, memory_server: RunningServer
) -> None:
    case.call_and_validate(
        base_url=f"{memory_server.url}/memory",
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
