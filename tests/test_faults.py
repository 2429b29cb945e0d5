"""Bad input and upstream faults: always OpenAI's error envelope, never a traceback,
and the proxy keeps serving the next request."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import openai
import pytest

from tests.conftest import MakeClient, MakeProxy
from tests.fakes.servers import RunningServer, run_server
from tests.fakes.upstream import FakeUpstream, Reply

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def post(proxy: RunningServer, body: bytes | dict, timeout: object = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def still_serves(proxy: RunningServer, upstream: FakeUpstream) -> None:
    upstream.enqueue(Reply(text="still here"))
    response = post(proxy, CHAT)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "still here"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b'{"model": "x", "messages": [', None, "not valid JSON"),
        # Not JSON's numbers: stored, they would break every answer that shows them.
        (b'{"model": "x", "messages": [], "temperature": NaN}', None, "NaN"),
        (b'{"model": "x", "messages": [], "weight": 1e999}', None, "1e999"),
        # Nested deeper than the parser goes: a 400 too, not a 500.
        (b'{"model": "x", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "not valid JSON"),
        (b"", None, "empty"),
        (b'["a list"]', None, "JSON object"),
        (b'"a string"', None, "JSON object"),
        ({"model": "fake-model"}, "messages", "required"),
        ({"model": "fake-model", "messages": "hi"}, "messages", "array"),
        ({"model": "fake-model", "messages": []}, "messages", "empty"),
        ({"model": "fake-model", "messages": ["hi"]}, "messages[0]", "object"),
        ({"model": "fake-model", "messages": [{"content": "x"}]}, "messages[0].role", "role"),
        (
            {"model": "fake-model", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "wizard",
        ),
        (
            {"model": "fake-model", "messages": [{"role": "user", "content": 42}]},
            "messages[0].content",
            "string",
        ),
        (
            {"model": "fake-model", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0]",
            "type",
        ),
        ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model", "string"),
        (
            {
                "model": "fake-model",
                "stream": "yes",
                "messages": [{"role": "user", "content": "x"}],
            },
            "stream",
            "boolean",
        ),
        (
            {
                "model": "fake-model",
                "max_tokens": "9",
                "messages": [{"role": "user", "content": "x"}],
            },
            "max_tokens",
            "integer",
        ),
    ],
)
def test_bad_bodies_get_400_naming_the_field(
    upstream: FakeUpstream, make_proxy: MakeProxy, body, param, words
) -> None:
    proxy = make_proxy({"local": upstream})
    response = post(proxy, body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    assert upstream.chat_requests == []
    still_serves(proxy, upstream)


def test_passthrough_of_json_nested_too_deeply_is_the_upstreams_to_judge(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy({"local": upstream})
    deep = b'{"model": "fake-model", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = httpx.post(
        f"{proxy.url}/v1/embeddings",
        content=deep,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400  # the fake upstream's own answer, relayed
    assert "the body must be JSON" in error_of(response)["message"]
    assert [r.path for r in upstream.requests] == ["/v1/embeddings"]
    still_serves(proxy, upstream)


def test_huge_body_gets_413(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy({"local": upstream}, server={"max_body_bytes": 4096})
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    response = post(proxy, big)
    assert response.status_code == 413
    assert "4096" in error_of(response)["message"]
    # Also when the client streams it without announcing a length.
    chunked = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=iter([json.dumps(big).encode()[i : i + 1000] for i in range(0, 10_100, 1000)]),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413
    still_serves(proxy, upstream)


def test_unknown_model_without_default_is_404(make_proxy: MakeProxy) -> None:
    with FakeUpstream() as a, FakeUpstream() as b:
        proxy = make_proxy({"a": a, "b": b})
        response = post(proxy, {**CHAT, "model": "mystery"})
        assert response.status_code == 404
        error = error_of(response)
        assert error["code"] == "model_not_found" and "mystery" in error["message"]
        assert post(proxy, {**CHAT, "model": "b/fake-model"}).status_code == 200


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_upstream_down_is_502_naming_it(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(
        {"down": f"http://127.0.0.1:{_closed_port()}/v1", "local": upstream},
        server={"default_upstream": "down"},
    )
    # A model nobody lists goes to the default upstream ("fake-model" is local's).
    response = post(proxy, {**CHAT, "model": "unlisted-model"})
    assert response.status_code == 502
    error = error_of(response)
    assert "'down'" in error["message"] and error["code"] == "upstream_unreachable"
    assert post(proxy, {**CHAT, "model": "local/fake-model"}).status_code == 200


def test_upstream_error_status_passes_through_with_body(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    body = {
        "error": {
            "message": "model overloaded",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    upstream.enqueue(Reply(status=500, error_body=body), Reply(status=429, error_body=body))
    proxy = make_proxy({"local": upstream})
    response = post(proxy, CHAT)
    assert response.status_code == 500 and response.json() == body
    streamed = post(proxy, {**CHAT, "stream": True})
    assert streamed.status_code == 429 and streamed.json() == body
    still_serves(proxy, upstream)


def test_upstream_rate_limit_headers_pass_through(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    # Clients back off by them (the openai SDKs read Retry-After).
    limited = {"retry-after": "20", "x-ratelimit-remaining-requests": "0"}
    upstream.enqueue(Reply(status=429, headers=limited), Reply(status=429, headers=limited))
    proxy = make_proxy({"local": upstream})
    for body in (CHAT, {**CHAT, "stream": True}):
        response = post(proxy, body)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "20"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert response.headers["content-type"].startswith("application/json")
        assert error_of(response)["message"]
    still_serves(proxy, upstream)


async def _html_gateway_error(scope, receive, send) -> None:
    """A reverse proxy in front of a dead model server: HTML, not JSON."""
    if scope["type"] != "http":
        return
    body = b"<html><body><h1>503 Service Unavailable</h1></body></html>"
    await send(
        {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/html")]}
    )
    await send({"type": "http.response.body", "body": body})


def test_upstream_non_json_error_is_wrapped(make_proxy: MakeProxy) -> None:
    with run_server(_html_gateway_error, lifespan="off") as gateway:
        proxy = make_proxy({"local": f"{gateway.url}/v1"})
        response = post(proxy, CHAT)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"  # rewrapped: not HTML
    message = error_of(response)["message"]
    assert "'local'" in message and "503 Service Unavailable" in message


def test_upstream_hanging_past_timeout_is_504(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(hang=True), Reply(hang=True))
    proxy = make_proxy({"local": {"base_url": upstream, "read_timeout": 0.5}})
    started = time.monotonic()
    response = post(proxy, CHAT)
    assert response.status_code == 504
    assert time.monotonic() - started < 5
    error = error_of(response)
    assert error["code"] == "upstream_timeout" and "'local'" in error["message"]
    streamed = post(proxy, {**CHAT, "stream": True})
    assert streamed.status_code == 504
    still_serves(proxy, upstream)


def _sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def test_upstream_closing_mid_stream_becomes_an_error_event(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(text="one two three four five six", fail_after=2))
    proxy = make_proxy({"local": upstream})
    response = post(proxy, {**CHAT, "stream": True})
    assert response.status_code == 200
    events = _sse_events(response.text)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert "'local'" in error["message"]
    assert any('"content"' in e for e in events[:-2])  # what arrived was relayed first
    still_serves(proxy, upstream)


def test_openai_client_sees_mid_stream_failure(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    upstream.enqueue(Reply(text="one two three four", fail_after=1))
    proxy = make_proxy({"local": upstream})
    with pytest.raises(openai.APIError, match="local"):
        list(make_client(proxy).chat.completions.create(stream=True, **CHAT))


def test_invalid_sse_becomes_an_error_event(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    upstream.enqueue(Reply(text="one two three", invalid_sse=True))
    proxy = make_proxy({"local": upstream})
    events = _sse_events(post(proxy, {**CHAT, "stream": True}).text)
    assert events[-1] == "data: [DONE]"
    assert "invalid stream" in json.loads(events[-2][len("data: ") :])["error"]["message"]
    still_serves(proxy, upstream)


def test_client_disconnect_closes_the_upstream_request(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(text=" ".join(["word"] * 50), delay_between=0.2))
    proxy = make_proxy({"local": upstream})
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # the user pressed stop after the first chunk
    closed_at = time.monotonic()
    assert upstream.disconnected.wait(2.0)
    assert upstream.disconnects[0].disconnected_at - closed_at < 1.0
    still_serves(proxy, upstream)


def test_client_disconnect_while_upstream_is_silent(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(hang=True))
    proxy = make_proxy({"local": upstream})
    with pytest.raises(httpx.ReadTimeout):
        post(proxy, CHAT, timeout=httpx.Timeout(5, read=0.5))
    assert upstream.disconnected.wait(2.0)
    still_serves(proxy, upstream)


def test_unknown_path_is_an_enveloped_404(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy({"local": upstream})
    response = httpx.get(f"{proxy.url}/nothing/here")
    assert response.status_code == 404
    assert "nothing/here" in error_of(response)["message"]
    wrong_method = httpx.put(f"{proxy.url}/healthz")
    assert wrong_method.status_code == 405
    assert "GET" in wrong_method.headers["allow"]
    assert "GET" in error_of(wrong_method)["message"]


def test_read_timeout_is_the_longest_silence_not_the_whole_answer(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(text="one two three four five", delay_between=0.25))
    proxy = make_proxy({"local": {"base_url": upstream, "read_timeout": 0.6}})
    started = time.monotonic()
    events = _sse_events(post(proxy, {**CHAT, "stream": True}).text)
    assert time.monotonic() - started >= 1.0  # longer than the timeout, in small gaps
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in e for e in events)
    upstream.enqueue(Reply(text="one two", delay_between=1.5))
    events = _sse_events(post(proxy, {**CHAT, "stream": True}).text)
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["code"] == "upstream_timeout" and "waiting for data" in error["message"]
    still_serves(proxy, upstream)


def test_waiting_for_a_connection_past_connect_timeout_is_504(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(hang=True))  # holds the only connection
    proxy = make_proxy(
        {"local": {"base_url": upstream, "max_connections": 1, "connect_timeout": 0.5}}
    )
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        hung = executor.submit(post, proxy, CHAT, httpx.Timeout(5, read=2.0))
        upstream.wait_for_chat_requests(1)
        started = time.monotonic()
        response = post(proxy, CHAT)
        assert time.monotonic() - started < 1.5
        with pytest.raises(httpx.ReadTimeout):
            hung.result()
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "upstream_timeout" and "connecting (limit 0.5 s)" in error["message"]
    still_serves(proxy, upstream)
