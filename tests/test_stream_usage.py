"""Streamed replies report usage to the memory layer, never to a client that did not
ask: SillyTavern streams without `stream_options.include_usage`, and the token budget
is calibrated from the upstream's own `prompt_tokens`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.inject.tokens import TokenCounter
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import filler, st_body
from tests.test_memory_chat import MAX_TOKENS, WINDOW, memory_proxy

HISTORY = [("user", "Hi Mira, where does this road lead?")]
USAGE = {"include_usage": True}


@pytest.fixture
def llama() -> Iterator[FakeUpstream]:
    """A llama.cpp-like upstream that reports a small context window at /props."""
    with FakeUpstream(flavor="llamacpp", context_window=WINDOW) as up:
        yield up


def post(proxy: RunningServer, body: dict[str, Any], **headers: str) -> httpx.Response:
    """Send a chat request as SillyTavern does (JSON bytes, the whole reply read)."""
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer undefined"} | headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def chunks(stream: bytes) -> list[dict[str, Any]]:
    """The JSON data of each event of a relayed stream (not `[DONE]`)."""
    assert stream.endswith(b"data: [DONE]\n\n")
    events = [e for e in stream.split(b"\n\n") if e.startswith(b"data: ")]
    return [json.loads(e[6:]) for e in events if e != b"data: [DONE]"]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])


def test_sillytavern_stream_is_asked_for_usage_and_the_client_sees_none(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    llama.enqueue(Reply("Mira points north, past the old mill."))
    response = post(proxy, st_body(HISTORY, stream=True))
    sent = llama.last
    assert sent["stream_options"] == USAGE
    got = chunks(response.content)
    assert all("usage" not in c for c in got)  # neither the usage chunk nor a null one
    assert all(c["choices"] for c in got)
    assert text_of(got) == "Mira points north, past the old mill."
    # Event for event what the upstream sends a request without stream_options.
    plain = {k: v for k, v in sent.items() if k != "stream_options"}
    llama.enqueue(Reply("Mira points north, past the old mill."))
    direct = httpx.post(f"{llama.base_url}/chat/completions", json=plain).content
    drop = ("id", "created")
    assert [{k: v for k, v in c.items() if k not in drop} for c in got] == [
        {k: v for k, v in c.items() if k not in drop} for c in chunks(direct)
    ]


def test_the_clients_own_stream_options_are_kept(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    # Asked for with its other options kept; not shown, since the client said no.
    options = {"include_usage": False, "continuous_usage_stats": False}
    response = post(proxy, st_body(HISTORY, stream=True, stream_options=options))
    assert llama.last["stream_options"] == {**options, "include_usage": True}
    assert all("usage" not in c for c in chunks(response.content))
    # A client that asked for usage itself gets it as the upstream sent it.
    llama.enqueue(Reply("Mira nods.", usage={"prompt_tokens": 321}))
    response = post(proxy, st_body(HISTORY, stream=True, stream_options=USAGE))
    assert llama.last["stream_options"] == USAGE
    got = chunks(response.content)
    assert all("usage" in c for c in got)
    assert got[-1]["choices"] == [] and got[-1]["usage"]["prompt_tokens"] == 321
    assert text_of(got) == "Mira nods."


def test_usage_on_the_last_chunk_is_taken_out_of_that_event_only(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    head = b'{"id":"c1","object":"chat.completion.chunk","model":"fake-model",'
    opening = b"data: " + head + b'"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    # Not UTF-8 (Latin-1), and without usage: relayed as it came.
    middle = b"data: " + head + b'"choices":[{"index":0,"delta":{"content":"Caf\xe9"}}]}\n\n'
    comment = b": keep-alive\n\n"
    last = (
        b'id: 7\ndata: {"choices":[{"index":0,"delta":{"content":" ol\xc3\xa9"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":50,"total_tokens":53},'
        b'"timings":{"n":1}}\n\n'
    )
    llama.enqueue(Reply(raw=[opening, middle, comment, last, b"data: [DONE]\n\n"]))
    response = post(proxy, st_body(HISTORY, stream=True))
    assert llama.last["stream_options"] == USAGE
    edited = (
        b'id: 7\ndata: {"choices":[{"index":0,"delta":{"content":" ol\xc3\xa9"},'
        b'"finish_reason":"stop"}],"timings":{"n":1}}\n\n'
    )
    assert response.content == opening + middle + comment + edited + b"data: [DONE]\n\n"


def test_a_usage_chunk_with_more_in_it_keeps_the_rest(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    head = '{"id":"c1","object":"chat.completion.chunk","model":"m",'
    raw = [
        # Azure's content-filter chunk comes first, with no choices.
        f'data: {head}"choices":[],"prompt_filter_results":[{{"index":0}}],"usage":null}}\n\n',
        f'data: {head}"choices":[{{"index":0,"delta":{{"content":"Hi."}}}}],"usage":null}}\n\n',
        # llama.cpp's last chunk, once usage is asked for: usage and its timings.
        f'data: {head}"choices":[],"usage":{{"prompt_tokens":9}},"timings":{{"prompt_n":9}}}}\n\n',
        "data: [DONE]\n\n",
    ]
    llama.enqueue(Reply(raw=[r.encode() for r in raw]))
    got = chunks(post(proxy, st_body(HISTORY, stream=True)).content)
    assert [sorted(c) for c in got] == [
        ["choices", "id", "model", "object", "prompt_filter_results"],
        ["choices", "id", "model", "object"],
        ["choices", "id", "model", "object", "timings"],
    ]
    assert got[-1]["timings"] == {"prompt_n": 9}


def test_a_stream_calibrates_the_budget(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)  # prepares tiktoken's files
    counter = TokenCounter("o200k_base")
    # A model whose tokenizer needs twice the tokens ours counts: it says so in usage,
    # which a stream carries only when asked.
    llama.responder = lambda body: Reply(
        text="Mira nods.", usage={"prompt_tokens": 2 * counter.count_messages(body["messages"])}
    )
    history = [(r, filler(i)) for i in range(80) for r in ("user", "assistant")][:-1]
    body = st_body(history, stream=True)
    before = post(proxy, body, **{"X-Memory-Scope": "tok"})
    sent_before = counter.count_messages(llama.last["messages"])
    after = post(proxy, body, **{"X-Memory-Scope": "tok", "X-Memory-Write": "off"})
    sent_after = counter.count_messages(llama.last["messages"])
    assert int(after.headers["x-memory-trimmed"]) > int(before.headers["x-memory-trimmed"])
    assert int(after.headers["x-memory-prompt-tokens"]) < int(
        before.headers["x-memory-prompt-tokens"]
    )
    # In the upstream's own tokens the prompt now fits its window.
    assert 2 * sent_after <= WINDOW - MAX_TOKENS
    assert sent_after < sent_before


def test_a_short_prompt_does_not_shrink_later_budgets(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    counter = TokenCounter("o200k_base")
    # A server that adds a fixed few hundred tokens of its own around every prompt.
    llama.responder = lambda body: Reply(
        text="Mira nods.", usage={"prompt_tokens": counter.count_messages(body["messages"]) + 250}
    )
    post(proxy, st_body(HISTORY, stream=True), **{"X-Memory-Scope": "short"})
    history = [(r, filler(i)) for i in range(15) for r in ("user", "assistant")][:-1]
    long = post(proxy, st_body(history, stream=True), **{"X-Memory-Scope": "long"})
    assert long.headers["x-memory-trimmed"] == "0"  # it fits the window as it is


def test_an_upstream_that_refuses_stream_options_is_asked_once(
    make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mnemoproxy.chat")
    with FakeUpstream(flavor="llamacpp", reject_stream_options=True) as old:
        proxy = memory_proxy(make_proxy, old, tmp_path)
        old.enqueue(Reply("Mira shrugs."))
        first = post(proxy, st_body(HISTORY, stream=True))
        assert text_of(chunks(first.content)) == "Mira shrugs."
        asked = old.chat_requests
        assert len(asked) == 2
        assert asked[0].json["stream_options"] == USAGE
        assert "stream_options" not in asked[1].json
        history = [*HISTORY, ("assistant", "Mira shrugs."), ("user", "Then we walk.")]
        old.enqueue(Reply("Mira walks."))
        second = post(proxy, st_body(history, stream=True))
        assert text_of(chunks(second.content)) == "Mira walks."
        asked = old.chat_requests
        assert len(asked) == 3 and "stream_options" not in asked[2].json
    refusals = [r for r in caplog.records if "stream_options" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO


def test_a_request_refused_anyway_is_not_taken_for_a_refusal_of_stream_options(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    llama.responder = lambda body: Reply(status=400)
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", json=st_body(HISTORY, stream=True), timeout=30
    )
    # An answer that does not name the field is not about it ("model is loading"): the
    # client gets it as it came, asked once, and the next request is asked for usage.
    assert response.status_code == 400
    assert len(llama.chat_requests) == 1
    httpx.post(f"{proxy.url}/v1/chat/completions", json=st_body(HISTORY, stream=True))
    asked = llama.chat_requests
    assert len(asked) == 2 and asked[1].json["stream_options"] == USAGE


def test_only_streams_with_memory_on_are_asked_for_usage(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    raw = json.dumps(st_body(HISTORY, stream=True)).encode()
    headers = {"Content-Type": "application/json"}
    # Memory off: forwarded byte for byte, relayed as it came.
    plain = make_proxy({"local": llama})
    response = httpx.post(f"{plain.url}/v1/chat/completions", content=raw, headers=headers)
    assert llama.chat_requests[-1].body == raw
    assert text_of(chunks(response.content)) == "Hello from the fake upstream."
    # Memory on: a non-streamed request already gets usage, and is not given options.
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    reply = post(proxy, st_body(HISTORY))
    assert "stream_options" not in llama.last and reply.json()["usage"]["prompt_tokens"] > 0
    # ... while the same request streamed is.
    post(proxy, st_body(HISTORY, stream=True))
    assert llama.last["stream_options"] == USAGE
