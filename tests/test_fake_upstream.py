"""The fake upstream and the real-socket runner behave like the servers they stand for."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.fakes.servers import run_server
from tests.fakes.upstream import FakeUpstream, Reply, embed_text

USER = [{"role": "user", "content": "Hello, who are you?"}]  # 19 characters


def client_for(up: FakeUpstream, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key=key, max_retries=0, timeout=5)


def sse_events(raw: bytes) -> list[str]:
    """The data fields of a raw SSE body, in order."""
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


def chat(up: FakeUpstream, **body: Any) -> httpx.Response:
    payload = {"model": "m", "messages": USER, **body}
    return httpx.post(up.base_url + "/chat/completions", json=payload, timeout=5)


# -- run_server ---------------------------------------------------------------------------


def test_run_server_serves_a_real_socket_on_a_free_port_and_stops() -> None:
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    with run_server(app) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url + "/").text == "hi"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/", timeout=1)


def test_run_server_raises_the_apps_lifespan_startup_error() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise ValueError("database file is missing")
        yield

    with (
        pytest.raises(ValueError, match="database file is missing"),
        run_server(Starlette(lifespan=lifespan)),
    ):
        pytest.fail("the block must not run when startup failed")


def test_run_server_reports_a_lifespan_startup_failure_message() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no upstream configured"})

    with pytest.raises(RuntimeError, match="no upstream configured"), run_server(app):
        pytest.fail("the block must not run when startup failed")


def test_run_server_raises_a_lifespan_shutdown_error_on_exit() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise OSError("could not flush the store")

    with pytest.raises(OSError, match="could not flush"), run_server(Starlette(lifespan=lifespan)):
        pass


# -- chat completions ---------------------------------------------------------------------


def test_openai_client_gets_a_full_completion_and_the_key_is_recorded() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("Nice to meet you."))
        with client_for(up, key="sk-user-key") as client:
            answer = client.chat.completions.create(model="my-model", messages=USER)
        assert answer.choices[0].message.content == "Nice to meet you."
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].finish_reason == "stop"
        assert answer.model == "my-model"
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == 19 // 4
        assert answer.usage.completion_tokens == 4  # "Nice", " to", " meet", " you."
        assert up.chat_requests[0].headers["authorization"] == "Bearer sk-user-key"
        assert up.last["messages"] == USER


def test_openai_client_streams_pieces_and_a_usage_chunk() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("One two three."))
        with client_for(up) as client:
            stream = client.chat.completions.create(
                model="m", messages=USER, stream=True, stream_options={"include_usage": True}
            )
            chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One two three."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_openai_sse_ending_with_done() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("Hi you", extra_chunk_fields={"timings": {"predicted_n": 2}}))
        response = chat(up, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"content": " you"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert all(c["object"] == "chat.completion.chunk" and c["timings"] for c in chunks)
    assert "usage" not in chunks[0]  # only with stream_options.include_usage


def test_replies_come_from_the_queue_then_the_default_and_a_responder_wins() -> None:
    with FakeUpstream() as up:
        up.enqueue("first", Reply("second"))
        up.default = Reply("fallback")
        texts = [chat(up).json()["choices"][0]["message"]["content"] for _ in range(3)]
        assert texts == ["first", "second", "fallback"]
        up.responder = lambda body: f"echo: {body['messages'][-1]['content']}"
        assert chat(up).json()["choices"][0]["message"]["content"] == "echo: Hello, who are you?"


def test_a_failing_responder_answers_500_and_is_raised_at_close() -> None:
    up = FakeUpstream().start()
    up.responder = lambda body: 1 / 0
    assert chat(up).status_code == 500
    with pytest.raises(ZeroDivisionError):
        up.close()


def test_n_choices_and_explicit_chunks() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply(chunks=["Wh", "at?"]))
        body = chat(up, n=2).json()
        assert [c["message"]["content"] for c in body["choices"]] == ["What?", "What?"]
        assert [c["index"] for c in body["choices"]] == [0, 1]


def test_tool_calls_stream_as_deltas_the_openai_client_can_reassemble() -> None:
    call = {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    with FakeUpstream() as up:
        up.enqueue(Reply("", tool_calls=[call]), Reply("", tool_calls=[call]))
        with client_for(up) as client:
            whole = client.chat.completions.create(model="m", messages=USER)
            stream = list(client.chat.completions.create(model="m", messages=USER, stream=True))
    message = whole.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert whole.choices[0].finish_reason == "tool_calls"
    deltas = [d for c in stream for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "call_1"
    assert deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    arguments = "".join((d.function.arguments or "") for d in deltas if d.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert len(deltas) > 2  # the arguments arrive in fragments
    assert stream[-1].choices[0].finish_reason == "tool_calls"


def test_each_piece_is_flushed_as_it_is_produced() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply(chunks=["a", "b", "c", "d", "e"], delay_between=0.1))
        start = time.monotonic()
        arrivals = []
        with httpx.stream(
            "POST",
            up.base_url + "/chat/completions",
            json={"model": "m", "messages": USER, "stream": True},
        ) as response:
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[0] < 0.2  # long before the last piece is even produced
    assert arrivals[-1] - arrivals[0] >= 0.35


def test_delay_first_holds_back_the_first_byte() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("late", delay_first=0.3))
        start = time.monotonic()
        assert chat(up).status_code == 200
        assert time.monotonic() - start >= 0.29


def test_fail_after_drops_the_stream_without_an_ending() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("one two three four", fail_after=2))
        received: list[str] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream(
                "POST",
                up.base_url + "/chat/completions",
                json={"model": "m", "messages": USER, "stream": True},
            ) as response,
        ):
            for line in response.iter_lines():
                received.append(line)
        data = [json.loads(x.removeprefix("data: ")) for x in received if x.startswith("data: {")]
        assert [c["choices"][0]["delta"].get("content") for c in data] == ["", "one", " two"]
        assert "data: [DONE]" not in received
        # a non-streaming answer is cut in the middle of its body
        up.enqueue(Reply("cut short", fail_after=0))
        with pytest.raises(httpx.RemoteProtocolError):
            chat(up)
        assert up.disconnects == []  # the server dropped these, not the client


def test_invalid_sse_breaks_the_openai_client() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("a b", invalid_sse=True))
        raw = chat(up, stream=True).content
        assert b"data: {not json" in raw
        up.enqueue(Reply("a b", invalid_sse=True))
        with pytest.raises(json.JSONDecodeError):
            chat(up).json()
        up.enqueue(Reply("a b", invalid_sse=True))
        with client_for(up) as client, pytest.raises(json.JSONDecodeError):
            list(client.chat.completions.create(model="m", messages=USER, stream=True))


def test_raw_pieces_are_the_body_as_given_one_write_each() -> None:
    with FakeUpstream() as up:
        pieces = [b'data: {"choices": 5}\n\n', b"data: {odd\n\n"]
        up.enqueue(Reply(raw=pieces, delay_between=0.3))
        started, arrivals = time.monotonic(), []
        with httpx.stream(
            "POST",
            up.base_url + "/chat/completions",
            json={"model": "m", "messages": USER, "stream": True},
        ) as response:
            assert response.headers["content-type"] == "text/event-stream"
            for data in response.iter_raw():
                arrivals.append((data, time.monotonic() - started))
        assert [data for data, _ in arrivals] == pieces
        assert arrivals[1][1] - arrivals[0][1] >= 0.25
        up.enqueue(Reply(raw=[b'{"choices": ', b"5}"]))
        whole = chat(up)
        assert whole.headers["content-type"] == "application/json"
        assert whole.content == b'{"choices": 5}'


def test_raw_pieces_take_the_content_type_the_reply_names() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply(raw=[b'{"choices": 5}'], headers={"Content-Type": "application/json"}))
        asked_stream = chat(up, stream=True)
        up.enqueue(Reply(raw=[b"data: {}\n\n"], headers={"Content-Type": "text/event-stream"}))
        asked_whole = chat(up)
    assert asked_stream.headers.get_list("content-type") == ["application/json"]
    assert asked_stream.content == b'{"choices": 5}'
    assert asked_whole.headers.get_list("content-type") == ["text/event-stream"]
    assert asked_whole.content == b"data: {}\n\n"


def test_client_leaving_mid_stream_is_seen_at_once_while_the_fake_sleeps() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply("a b c d e f", delay_between=5.0))
        with httpx.stream(
            "POST",
            up.base_url + "/chat/completions",
            json={"model": "m", "messages": USER, "stream": True},
        ) as response:
            next(response.iter_lines())
            left_at = time.monotonic()
        assert up.disconnected.wait(1.0)
        [gone] = up.disconnects
        assert gone.disconnected_at is not None
        assert gone.disconnected_at - left_at < 0.5
        assert gone.path == "/v1/chat/completions"


def test_hang_answers_nothing_until_the_client_gives_up() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply(hang=True))
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                up.base_url + "/chat/completions",
                json={"model": "m", "messages": USER},
                timeout=0.3,
            )
        assert up.disconnected.wait(1.0)
        assert time.monotonic() - start < 1.5


def test_closing_with_a_request_still_hanging_is_quick() -> None:
    up = FakeUpstream().start()
    up.enqueue(Reply(hang=True))
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(chat(up).status_code)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    up.wait_for_chat_requests(1)
    start = time.monotonic()
    up.close()
    assert time.monotonic() - start < 1.0
    caller.join(5)
    assert outcome and outcome[0] != 200  # the caller was released, not answered


def test_status_errors_reach_the_client_in_openais_envelope() -> None:
    with FakeUpstream() as up:
        up.enqueue(Reply(status=429, headers={"retry-after": "1"}))
        with client_for(up) as client, pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=USER)
        assert caught.value.response.headers["retry-after"] == "1"
        up.enqueue(Reply(status=500, error_body={"error": {"message": "model crashed"}}))
        response = chat(up, stream=True)  # an error is JSON even when a stream was asked for
        assert response.status_code == 500
        assert response.json() == {"error": {"message": "model crashed"}}
        assert chat(up, messages="not a list").status_code == 400


# -- the other endpoints ------------------------------------------------------------------


def test_models_embeddings_and_legacy_completions() -> None:
    with FakeUpstream(models=["alpha", "beta"]) as up, client_for(up) as client:
        assert [m.id for m in client.models.list()] == ["alpha", "beta"]
        httpx.get(up.base_url + "/models?verbose=1", headers={"X-Memory-Scope": "s1"})
        assert up.requests[-1].query == "verbose=1"
        assert up.requests[-1].headers["x-memory-scope"] == "s1"
        assert client.models.retrieve("beta").owned_by == "fake"
        up.embedding_dim = 8
        vectors = client.embeddings.create(model="e", input=["cat", "dog", "cat"]).data
        assert [len(v.embedding) for v in vectors] == [8, 8, 8]
        assert vectors[0].embedding == pytest.approx(vectors[2].embedding, abs=1e-6)
        assert vectors[0].embedding != pytest.approx(vectors[1].embedding, abs=1e-6)
        assert math.isclose(sum(x * x for x in vectors[0].embedding), 1.0, rel_tol=1e-5)
        plain = httpx.post(up.base_url + "/embeddings", json={"input": "cat"}).json()
        assert plain["data"][0]["embedding"] == pytest.approx(embed_text("cat", 8))

        up.enqueue(Reply("once upon"), Reply("a time"))
        assert client.completions.create(model="m", prompt="Tell").choices[0].text == "once upon"
        pieces = client.completions.create(model="m", prompt="Tell", stream=True)
        assert "".join(p.choices[0].text for p in pieces) == "a time"
        assert up.chat_requests == []
        assert [r.path for r in up.requests][-2:] == ["/v1/completions", "/v1/completions"]


@pytest.mark.parametrize(
    ("flavor", "method", "path", "body"),
    [
        ("llamacpp", "GET", "/props", None),
        ("ollama", "POST", "/api/show", {"model": "fake-model"}),
        ("lmstudio", "GET", "/api/v0/models", None),
    ],
)
def test_each_flavor_reports_its_context_window_where_that_server_does(
    flavor: str, method: str, path: str, body: Any
) -> None:
    with FakeUpstream(flavor=flavor, context_window=8192) as up:
        info = httpx.request(method, up.url + path, json=body).json()
        with FakeUpstream(flavor="openai") as plain:
            assert httpx.request(method, plain.url + path, json=body).status_code == 404
    if flavor == "llamacpp":
        assert info["default_generation_settings"]["n_ctx"] == 8192
    elif flavor == "ollama":
        arch = info["model_info"]["general.architecture"]
        assert info["model_info"][f"{arch}.context_length"] == 8192
    else:
        assert info["data"][0]["max_context_length"] == 8192


def test_ollama_show_answers_404_for_an_unknown_model() -> None:
    with FakeUpstream(flavor="ollama") as up:
        response = httpx.post(up.url + "/api/show", json={"model": "nope"})
        assert response.status_code == 404
        assert "not found" in response.json()["error"]


def test_runs_as_its_own_process_for_benchmarks() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port), "--chunks", "7"]
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        deadline = time.monotonic() + 10
        while True:
            try:
                response = httpx.post(url, json={"model": "m", "messages": USER, "stream": True})
                break
            except httpx.ConnectError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the fake did not start"
                time.sleep(0.05)
        events = sse_events(response.content)
        pieces = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
        assert len(pieces) == 7
    finally:
        process.terminate()
        process.wait(10)
        if process.stderr:
            process.stderr.close()
