"""Access keys: who may use the proxy, and which key each upstream sees.

Two different secrets meet here and must never cross: the proxy's own access keys
([auth] keys, sent by the client) and each upstream's api_key (sent by the proxy).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.background_helpers import MemoryModel, job_kind, wait_for_jobs
from tests.conftest import MakeClient, MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import st_body

PROXY_KEY = "mp-proxy-key-1111"
UPSTREAM_KEY = "sk-upstream-secret-2222"
USER_KEY = "sk-users-own-key-3333"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def call(
    proxy: RunningServer, method: str, path: str, authorization: str | None, body: object = None
) -> httpx.Response:
    """One request to the proxy with exactly this Authorization header (None: no header)."""
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    content = json.dumps(body).encode() if body is not None else None
    return httpx.request(method, f"{proxy.url}{path}", content=content, headers=headers)


def assert_unauthorized(response: httpx.Response) -> dict:
    assert response.status_code == 401
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert "key" in body["error"]["message"].lower()
    return body["error"]


def upstream_authorizations(up: FakeUpstream) -> list[str | None]:
    """The Authorization header of every request the upstream received."""
    return [r.headers.get("authorization") for r in up.requests]


def assert_no_secret(response: httpx.Response, *secrets: str) -> None:
    """Neither the body nor any header of `response` contains one of `secrets`."""
    text = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in secrets:
        assert secret not in text


ENDPOINTS = [
    pytest.param("POST", "/v1/chat/completions", CHAT, id="chat"),
    pytest.param("POST", "/s/my-chat/v1/chat/completions", CHAT, id="scoped-chat"),
    pytest.param("GET", "/v1/models", None, id="models"),
    pytest.param(
        "POST", "/v1/embeddings", {"model": "fake-model", "input": "hi"}, id="passthrough"
    ),
    pytest.param("GET", "/v1/models/fake-model", None, id="passthrough-get"),
]


REFUSED = {
    "no header": None,
    "SillyTavern with no key set": "Bearer undefined",
    "wrong key": "Bearer wrong-key",
    "the key without 'Bearer'": PROXY_KEY,
    "'Bearer' without a key": "Bearer",
    "another scheme": f"Basic {PROXY_KEY}",
}


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_keys_configured_refuse_missing_or_wrong_key(
    upstream: FakeUpstream, make_proxy: MakeProxy, method: str, path: str, body: object
) -> None:
    proxy = make_proxy({"local": upstream}, auth={"keys": [PROXY_KEY]})
    for case, authorization in REFUSED.items():
        response = call(proxy, method, path, authorization, body)
        assert response.status_code == 401, case
        assert_unauthorized(response)
        assert_no_secret(response, PROXY_KEY)
    assert upstream.requests == []  # refused before anything reached the upstream


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_right_key_is_served(
    upstream: FakeUpstream, make_proxy: MakeProxy, method: str, path: str, body: object
) -> None:
    proxy = make_proxy({"local": upstream}, auth={"keys": ["another-key", PROXY_KEY]})
    response = call(proxy, method, path, f"Bearer {PROXY_KEY}", body)
    assert response.status_code == 200, response.text
    assert upstream.requests


def test_openai_client_with_and_without_the_key(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy({"local": upstream}, auth={"keys": [PROXY_KEY], "admin_keys": ["adm"]})
    good, admin, bad = (
        make_client(proxy, api_key=PROXY_KEY),
        make_client(proxy, api_key="adm"),
        make_client(proxy),  # "undefined", as SillyTavern sends with no key set
    )
    for client in (good, admin):
        reply = client.chat.completions.create(**CHAT)
        assert reply.choices[0].message.content == "Hello from the fake upstream."
        assert [m.id for m in client.models.list()] == ["fake-model"]
        assert client.embeddings.create(model="fake-model", input="hi").data
    with pytest.raises(openai.AuthenticationError) as chat_error:
        bad.chat.completions.create(**CHAT)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="fake-model", input="hi")
    assert chat_error.value.status_code == 401
    assert_unauthorized(chat_error.value.response)


def test_no_keys_configured_accepts_anything_sillytavern_sends(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy({"local": upstream})
    for authorization in ("Bearer undefined", None, "Bearer whatever", "Basic Zm9vOmJhcg=="):
        assert call(proxy, "POST", "/v1/chat/completions", authorization, CHAT).status_code == 200
        assert call(proxy, "GET", "/v1/models", authorization).status_code == 200
    client = make_client(proxy)  # api_key="undefined"
    assert client.chat.completions.create(**CHAT).choices[0].message.content


def test_healthz_needs_no_key(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy({"local": upstream}, auth={"keys": [PROXY_KEY]})
    response = httpx.get(f"{proxy.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# -- which key the upstream sees ----------------------------------------------------------


def test_upstream_gets_its_own_key_never_the_clients(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy(
        {"local": {"base_url": upstream, "api_key": UPSTREAM_KEY}}, auth={"keys": [PROXY_KEY]}
    )
    client = make_client(proxy, api_key=PROXY_KEY)
    client.chat.completions.create(**CHAT)
    list(client.chat.completions.create(**CHAT, stream=True))
    client.models.list()
    client.embeddings.create(model="fake-model", input="hi")
    client.models.retrieve("fake-model")
    paths = {r.path for r in upstream.requests}
    assert paths == {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/embeddings",
        "/v1/models/fake-model",
    }
    assert set(upstream_authorizations(upstream)) == {f"Bearer {UPSTREAM_KEY}"}
    for request in upstream.requests:
        assert PROXY_KEY not in json.dumps(request.headers) + request.body.decode()


def test_client_key_not_forwarded_by_default(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    """No upstream api_key and no forward_client_key: the upstream sees no key at all."""
    proxy = make_proxy({"local": upstream}, auth={"keys": [PROXY_KEY]})
    client = make_client(proxy, api_key=PROXY_KEY)
    client.chat.completions.create(**CHAT)
    client.embeddings.create(model="fake-model", input="hi")
    client.models.list()
    assert len(upstream.requests) == 3
    assert upstream_authorizations(upstream) == [None, None, None]


def test_client_key_not_forwarded_by_default_without_proxy_keys(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    """An open proxy: whatever the app sends as its key stays here too."""
    proxy = make_proxy({"local": upstream})
    client = make_client(proxy, api_key=USER_KEY)
    client.chat.completions.create(**CHAT)
    client.embeddings.create(model="fake-model", input="hi")
    assert upstream_authorizations(upstream) == [None, None]


def test_forward_client_key_sends_the_clients_authorization(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy({"local": {"base_url": upstream, "forward_client_key": True}})
    client = make_client(proxy, api_key=USER_KEY)
    client.chat.completions.create(**CHAT)
    list(client.chat.completions.create(**CHAT, stream=True))
    client.embeddings.create(model="fake-model", input="hi")
    assert upstream_authorizations(upstream) == [f"Bearer {USER_KEY}"] * 3


def test_background_work_uses_the_client_key_the_upstream_accepted(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # No key in the config: summaries and facts have no client to take one from.
    model = MemoryModel(chat=lambda body: "Noted.")
    upstream.responder = model
    proxy = make_proxy(
        {"local": {"base_url": upstream, "forward_client_key": True}},
        memory={"enabled": True, "database": str(tmp_path / "memory.db")},
        embeddings={"backend": "upstream", "upstream": "local", "model": "fake-model"},
        background={"llm": True, "backoff_seconds": 0.05},
    )
    body = st_body([("user", "My sister Ana keeps a lighthouse.")])
    headers = {"Authorization": f"Bearer {USER_KEY}", "X-Memory-Scope": "keyed"}
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    wait_for_jobs(tmp_path / "memory.db")
    background = [r for r in upstream.chat_requests if job_kind(r.json) is not None]
    assert background  # facts were asked for, with the key, not without one
    assert {r.headers.get("authorization") for r in background} == {f"Bearer {USER_KEY}"}


def test_upstream_api_key_wins_over_forward_client_key(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy(
        {"local": {"base_url": upstream, "api_key": UPSTREAM_KEY, "forward_client_key": True}}
    )
    client = make_client(proxy, api_key=USER_KEY)
    client.chat.completions.create(**CHAT)
    client.embeddings.create(model="fake-model", input="hi")
    assert upstream_authorizations(upstream) == [f"Bearer {UPSTREAM_KEY}"] * 2


def test_forward_client_key_also_lists_models_with_the_clients_key(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy({"local": {"base_url": upstream, "forward_client_key": True}})
    make_client(proxy, api_key=USER_KEY).models.list()
    assert upstream_authorizations(upstream) == [f"Bearer {USER_KEY}"]


def test_keys_of_two_upstreams_do_not_cross(make_proxy: MakeProxy, make_client: MakeClient) -> None:
    with FakeUpstream(models=["a-model"]) as a, FakeUpstream(models=["b-model"]) as b:
        proxy = make_proxy(
            {
                "a": {"base_url": a, "api_key": "sk-key-of-a"},
                "b": {"base_url": b, "api_key": "sk-key-of-b"},
            },
            server={"default_upstream": "a"},
        )
        client = make_client(proxy)
        client.chat.completions.create(model="b/b-model", messages=CHAT["messages"])
        client.chat.completions.create(model="a-model", messages=CHAT["messages"])
        client.models.list()
        assert set(upstream_authorizations(a)) == {"Bearer sk-key-of-a"}
        assert set(upstream_authorizations(b)) == {"Bearer sk-key-of-b"}


# -- the upstream key never reaches a client ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [200, 400, 401, 429, 500])
def test_upstream_key_never_in_a_response(
    upstream: FakeUpstream, make_proxy: MakeProxy, stream: bool, status: int
) -> None:
    upstream.enqueue(Reply(status=status), Reply(status=status))
    proxy = make_proxy(
        {"local": {"base_url": upstream, "api_key": UPSTREAM_KEY}}, auth={"keys": [PROXY_KEY]}
    )
    chat = call(
        proxy, "POST", "/v1/chat/completions", f"Bearer {PROXY_KEY}", {**CHAT, "stream": stream}
    )
    assert chat.status_code == status
    models = call(proxy, "GET", "/v1/models", f"Bearer {PROXY_KEY}")
    passthrough = call(
        proxy, "POST", "/v1/completions", f"Bearer {PROXY_KEY}", {"model": "x", "prompt": "hi"}
    )
    assert passthrough.status_code == status
    refused = call(proxy, "POST", "/v1/chat/completions", "Bearer wrong", CHAT)
    for response in (chat, models, passthrough, refused):
        assert_no_secret(response, UPSTREAM_KEY, PROXY_KEY)


def test_upstream_401_is_passed_through_without_the_key(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    """The upstream refuses our key: the client learns that, in OpenAI's envelope."""
    upstream.enqueue(Reply(status=401))
    proxy = make_proxy({"local": {"base_url": upstream, "api_key": UPSTREAM_KEY}})
    client = make_client(proxy)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(**CHAT)
    response = caught.value.response
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert_no_secret(response, UPSTREAM_KEY)


def test_unreachable_upstream_error_does_not_show_the_key(make_proxy: MakeProxy) -> None:
    with FakeUpstream() as gone:
        url = gone.base_url  # closed when the block ends: nothing listens there
    proxy = make_proxy({"local": {"base_url": url, "api_key": UPSTREAM_KEY}})
    for method, path, body in (
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v1/models", None),
        ("POST", "/v1/embeddings", {"model": "fake-model", "input": "hi"}),
        ("GET", "/readyz", None),
    ):
        response = call(proxy, method, path, "Bearer undefined", body)
        assert response.status_code in (502, 503)
        assert_no_secret(response, UPSTREAM_KEY)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_upstream_error_quoting_its_key_is_redacted(
    upstream: FakeUpstream, make_proxy: MakeProxy, path: str
) -> None:
    message = f"Incorrect API key provided: {UPSTREAM_KEY}."
    upstream.enqueue(Reply(status=401, error_body={"error": {"message": message}}))
    proxy = make_proxy({"local": {"base_url": upstream, "api_key": UPSTREAM_KEY}})
    body = CHAT if path.endswith("chat/completions") else {"model": "x", "prompt": "hi"}
    response = call(proxy, "POST", path, "Bearer undefined", body)
    assert response.status_code == 401
    assert_no_secret(response, UPSTREAM_KEY)
