"""The memory API's answers to mistakes read plainly: a 405 names every method the path
serves, a bad scope name in a body is worded as one in a path, a field of several
types is named without pydantic's member tags, and lists name what they accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.memory.scope import InvalidScope, validate_scope_name
from proxy.routes.auth import owner_of
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream
from tests.test_memory_api import api, error_of, memory_proxy, ok


@pytest.fixture
def up() -> Any:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def proxy(up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path) -> RunningServer:
    server = memory_proxy(make_proxy, up, tmp_path)
    ok(api(server, "POST", "/scopes", json={"name": "camp"}), 201)
    return server


# -- 405 -------------------------------------------------------------------------------------


def test_a_405_names_every_method_any_route_serves_at_the_path(proxy: RunningServer) -> None:
    # Each memory API method is a route of its own: the first one on the path used to
    # answer alone ("allowed: HEAD, GET" where POST exists too).
    cases = [
        ("DELETE", "/memory/scopes", "GET, HEAD, POST"),
        ("PUT", "/memory/scopes/x/memories", "GET, HEAD, POST"),
        ("POST", "/memory/scopes/x", "DELETE, GET, HEAD, PATCH"),
        ("PUT", "/memory/scopes/x/settings", "GET, HEAD, PATCH"),
        ("POST", "/memory/scopes/x/memories/7", "DELETE, GET, HEAD, PATCH"),
        ("POST", "/memory/scopes/x/scene", "DELETE, GET, HEAD, PATCH, PUT"),
        ("PUT", "/healthz", "GET, HEAD"),  # outside any mount
    ]
    for method, path, allowed in cases:
        response = httpx.request(method, f"{proxy.url}{path}", timeout=30)
        error = error_of(response, 405)
        assert response.headers["allow"] == allowed, (method, path)
        assert error["message"] == f"method not allowed: {method} {path} (allowed: {allowed})"
        assert error["type"] == "invalid_request_error"


# -- scope names in a body ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a b", "", "..", "a/b", "x" * 129, "-lead"])
def test_a_bad_scope_name_in_a_body_is_worded_as_in_a_path(proxy: RunningServer, name: str) -> None:
    with pytest.raises(InvalidScope) as refused:  # the words of the path's and header's check
        validate_scope_name(name)
    if name == "a b":  # and through the path itself
        assert error_of(api(proxy, "GET", "/scopes/a%20b"), 400)["message"] == str(refused.value)
    for method, path in (("POST", "/scopes"), ("PATCH", "/scopes/camp")):
        error = error_of(api(proxy, method, path, json={"name": name}), 400)
        assert error == {
            "message": str(refused.value),
            "type": "invalid_request_error",
            "param": "name",
            "code": "invalid_scope",
        }
    assert [s["name"] for s in ok(api(proxy, "GET", "/scopes"))["scopes"]] == ["camp"]


def test_a_good_scope_name_in_a_body_still_creates_and_renames(proxy: RunningServer) -> None:
    ok(api(proxy, "POST", "/scopes", json={"name": "tavern.v2:night-1"}), 201)
    renamed = ok(api(proxy, "PATCH", "/scopes/tavern.v2:night-1", json={"name": "inn_2"}))
    assert renamed["name"] == "inn_2"
    error = error_of(api(proxy, "POST", "/scopes", json={"name": 5}), 400)
    assert error["param"] == "name" and "valid string" in error["message"]


# -- a field of several types ---------------------------------------------------------------------


def test_a_field_of_several_types_is_named_without_the_member_tags(proxy: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "x", "date": True}]}
    error = error_of(api(proxy, "POST", "/scopes/camp/transcript", json=body), 400)
    assert error["param"] == "messages.0.date"
    assert error["message"] == (
        "body field 'messages.0.date': Input should be a valid number or a valid string"
    )
    # Two fields wrong: the second is counted once, not once per member of the first.
    body["messages"].append({"content": "y"})
    error = error_of(api(proxy, "POST", "/scopes/camp/transcript", json=body), 400)
    assert error["param"] == "messages.0.date"
    assert error["message"].endswith("a valid string (and 1 more problems)")
    # Optional fields carry no tag to strip: they read as before.
    error = error_of(api(proxy, "PATCH", "/scopes/camp/settings", json={"llm": "yes"}), 400)
    assert error["param"] == "llm"


# -- lists of words, owners -----------------------------------------------------------------------


def test_memory_states_name_all_among_them(proxy: RunningServer) -> None:
    error = error_of(api(proxy, "GET", "/scopes/camp/memories", params={"state": "lost"}), 400)
    assert error["message"] == (
        "state must be among active, retracted, superseded, all; got 'lost'"
    )
    # Named among them, it combines as the others do: all of them.
    ok(api(proxy, "POST", "/scopes/camp/memories", json={"text": "The boat leaks."}), 201)
    listed = ok(api(proxy, "GET", "/scopes/camp/memories", params={"state": "all,active"}))
    assert [m["text"] for m in listed["memories"]] == ["The boat leaks."]


def test_an_admin_is_told_which_owners_have_the_scope_in_plain_grammar(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    keys = {"keys": ["key-alice", "key-bob"], "admin_keys": ["key-admin"]}
    proxy = memory_proxy(make_proxy, up, tmp_path, auth=keys)
    alice, bob = owner_of("key-alice"), owner_of("key-bob")
    ok(api(proxy, "POST", "/scopes", "key-alice", json={"name": "diary"}), 201)
    for key in ("key-alice", "key-bob"):
        ok(api(proxy, "POST", "/scopes", key, json={"name": "shared"}), 201)

    one = error_of(api(proxy, "GET", "/scopes/diary", "key-admin"), 404)["message"]
    assert f"; owner {alice!r} has one: pass ?owner=" in one
    two = error_of(api(proxy, "GET", "/scopes/shared", "key-admin"), 404)["message"]
    assert "; owners " in two and " have one: pass ?owner=" in two, two
    assert repr(alice) in two and repr(bob) in two
