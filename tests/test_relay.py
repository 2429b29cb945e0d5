"""The transparent proxy: what goes in comes out, streaming as it arrives."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import httpx
import pytest

from proxy.memory.records import MessageRow
from proxy.upstreams.sse import EventSplitter, InvalidSSE
from tests.conftest import MakeClient, MakeProxy
from tests.fakes.servers import RunningServer, run_server
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import st_body, transcript_of, wait_until
from tests.test_cli import free_port

ST_BODY = {
    "messages": [
        {
            "role": "system",
            "content": "Write Mira's next reply in a fictional chat between Mira and Tom.",
        },
        {"role": "assistant", "content": "*Mira looks up from her book.* Oh, hello there."},
        {"role": "user", "content": "Hi Mira, what are you reading?"},
    ],
    "model": "fake-model",
    "temperature": 1,
    "max_tokens": 300,
    "stream": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "top_p": 1,
    "logit_bias": {},
}


def test_non_streaming_reply_and_body_forwarded_byte_for_byte(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy({"local": upstream})
    raw = json.dumps({**ST_BODY, "an_unknown_field": {"kept": [1, 2]}}).encode()
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=raw,
        headers={"Content-Type": "application/json", "Authorization": "Bearer undefined"},
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert upstream.chat_requests[-1].body == raw


def test_openai_client_streaming_with_usage(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    upstream.enqueue(Reply(text="One two three four.", extra_chunk_fields={"timings": {"n": 1}}))
    proxy = make_proxy({"local": upstream})
    client = make_client(proxy)
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One two three four."
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[0].model_extra.get("timings") == {"n": 1}  # unknown chunk fields kept


def test_stream_ends_with_done_and_keeps_every_event(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy({"local": upstream})
    body = {**ST_BODY, "stream": True}
    direct = httpx.post(f"{upstream.base_url}/chat/completions", json=body).text
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body)
    relayed = response.text
    assert relayed.endswith("data: [DONE]\n\n")
    # One of each: fetch joins repeated headers ("text/event-stream, text/...").
    names = [name.lower() for name, _ in response.headers.multi_items()]
    assert names.count("content-type") == 1 and names.count("cache-control") == 1
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    strip = [json.loads(e[6:])["choices"] for e in direct.split("\n\n") if e.startswith("data: {")]
    got = [json.loads(e[6:])["choices"] for e in relayed.split("\n\n") if e.startswith("data: {")]
    assert got == strip


def test_first_chunk_arrives_before_upstream_finishes(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    upstream.enqueue(Reply(chunks=["a", "b", "c", "d", "e"], delay_between=0.3))
    proxy = make_proxy({"local": upstream})
    started = time.monotonic()
    first = None
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json={**ST_BODY, "stream": True}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.monotonic() - started
    total = time.monotonic() - started
    assert first is not None and first < 0.5
    assert total >= 1.2  # the upstream took 4 x 0.3 s: the first chunk came long before


def test_models_merged_with_routing_prefix(make_proxy: MakeProxy, make_client: MakeClient) -> None:
    with (
        FakeUpstream(models=["llama3", "shared"]) as local,
        FakeUpstream(models=["gpt-x", "shared"]) as remote,
    ):
        proxy = make_proxy({"local": local, "remote": remote})
        client = make_client(proxy)
        # A name one upstream lists routes there bare; one both list needs its prefix.
        ids = {m.id for m in client.models.list()}
        assert ids == {"llama3", "gpt-x", "local/shared", "remote/shared"}
        hi = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="remote/gpt-x", messages=hi)
        assert reply.choices[0].message.content
        assert remote.last["model"] == "gpt-x"  # prefix removed before forwarding
        client.chat.completions.create(model="gpt-x", messages=hi)
        client.chat.completions.create(model="remote/shared", messages=hi)
        assert [r.json["model"] for r in remote.chat_requests] == ["gpt-x", "gpt-x", "shared"]
        assert local.chat_requests == []


def test_a_bare_name_goes_to_the_one_upstream_serving_it_without_a_listing_first(
    make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    # The app kept "gpt-x" from an earlier session and never asks /v1/models again.
    with (
        FakeUpstream(models=["llama3"]) as local,
        FakeUpstream(models=["gpt-x"]) as remote,
    ):
        proxy = make_proxy({"local": local, "remote": remote}, server={"default_upstream": "local"})
        client = make_client(proxy)
        hi = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="gpt-x", messages=hi)
        assert [r.json["model"] for r in remote.chat_requests] == ["gpt-x"]
        client.completions.create(model="gpt-x", prompt="Once")  # passed through likewise
        assert remote.requests[-1].path == "/v1/completions"
        # A name nobody serves goes to the default, and asks the upstreams only once.
        for _ in range(3):
            client.chat.completions.create(model="typo", messages=hi)
        assert [r.json["model"] for r in local.chat_requests] == ["typo"] * 3
        assert sum(r.path == "/v1/models" for r in local.requests) == 1


def test_a_bare_name_routes_while_another_upstream_is_down(
    make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    with (
        FakeUpstream(models=["llama3"]) as local,
        FakeUpstream(models=["gpt-x"]) as remote,
    ):
        down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
        proxy = make_proxy(
            {"local": local, "remote": remote, "down": down},
            server={"default_upstream": "local"},
        )
        client = make_client(proxy)
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "x"}])
        assert [r.json["model"] for r in remote.chat_requests] == ["gpt-x"]
        assert local.chat_requests == []


def test_a_bare_name_two_upstreams_serve_is_refused_with_both_names(
    make_proxy: MakeProxy,
) -> None:
    with FakeUpstream(models=["shared"]) as one, FakeUpstream(models=["shared"]) as two:
        proxy = make_proxy({"one": one, "two": two})  # no default upstream
        body = {"model": "shared", "messages": [{"role": "user", "content": "x"}]}
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 404
        assert "one/shared, two/shared" in response.json()["error"]["message"]


def test_explicit_routes_and_model_lists_pick_the_upstream(
    make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    with FakeUpstream() as a, FakeUpstream() as b:
        proxy = make_proxy(
            {"a": a, "b": {"base_url": b, "models": ["listed"]}},
            routes={"gpt-4*": "a"},
            server={"default_upstream": "a"},
        )
        client = make_client(proxy)
        for model in ("gpt-4o", "listed", "anything-else"):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert [r.json["model"] for r in a.chat_requests] == ["gpt-4o", "anything-else"]
        assert [r.json["model"] for r in b.chat_requests] == ["listed"]


def test_other_v1_endpoints_pass_through(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy({"local": upstream})
    client = make_client(proxy)
    vectors = client.embeddings.create(model="fake-model", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == upstream.embedding_dim
    completion = client.completions.create(model="fake-model", prompt="Once upon")
    assert completion.choices[0].text
    streamed = list(client.completions.create(model="fake-model", prompt="x", stream=True))
    assert streamed
    assert client.models.retrieve("fake-model").id == "fake-model"


def test_scope_path_routes_like_the_plain_path(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    proxy = make_proxy({"local": upstream})
    client = make_client(proxy, scope="my-chat")
    reply = client.chat.completions.create(model="fake-model", messages=ST_BODY["messages"])
    assert reply.choices[0].message.content
    assert {m.id for m in client.models.list()} == {"fake-model"}
    assert upstream.chat_requests[-1].path == "/v1/chat/completions"


def test_healthz_and_readyz(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy({"local": upstream})
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{proxy.url}/readyz").status_code == 200
    down = make_proxy({"local": upstream, "gone": "http://127.0.0.1:9/v1"})
    report = httpx.get(f"{down.url}/readyz")
    assert report.status_code == 503
    assert report.json()["upstreams"]["gone"]["ok"] is False
    assert report.json()["upstreams"]["local"]["ok"] is True


def test_metrics_count_requests(upstream: FakeUpstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy({"local": upstream})
    httpx.post(f"{proxy.url}/v1/chat/completions", json=ST_BODY)
    httpx.post(f"{proxy.url}/v1/chat/completions", content=b"{")
    text = httpx.get(f"{proxy.url}/metrics").text
    assert 'mnemoproxy_requests_total{route="/v1/chat/completions",status="200"} 1' in text
    assert 'mnemoproxy_requests_total{route="/v1/chat/completions",status="400"} 1' in text
    assert "mnemoproxy_upstream_seconds_count" in text


def test_n_greater_than_one_and_tool_calls_pass_through(
    upstream: FakeUpstream, make_proxy: MakeProxy, make_client: MakeClient
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    upstream.enqueue(Reply(tool_calls=[call]))
    proxy = make_proxy({"local": upstream})
    client = make_client(proxy)
    reply = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "call f"}], stream=False
    )
    assert reply.choices[0].message.tool_calls[0].function.name == "f"
    many = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], n=3
    )
    assert len(many.choices) == 3


# -- the SSE splitter: events checked, parsed only when someone needs them -------------

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}'
STREAMS = [
    CHUNK + b"\n\n" + CHUNK + b"\n\ndata: [DONE]\n\n",  # the usual shape
    (CHUNK + b"\r\n\r\n") * 2 + b"data: [DONE]\r\n\r\n",  # CRLF line endings
    b": keep-alive\n\nevent: delta\nid: 7\nretry: 100\n" + CHUNK + b"\n\n",  # other fields
    b'data: {"a":\ndata: 1}\n\n' + CHUNK + b"\n\n",  # data over two lines
    b"\n\n" + CHUNK + b"\n\n\n\n" + CHUNK + b"\n\n",  # extra blank lines
    b'data: {"c": "[DONE]"}\n\n' + CHUNK + b"\n\n",  # [DONE] in content is content
    b"data: [DONE]\n\n" + CHUNK + b"\n\n",  # an early [DONE] is dropped, not the end
    CHUNK + b"\n\n" + CHUNK,  # the last event without its blank line
]


def _splits(stream: bytes) -> list[list[bytes]]:
    """The stream whole, byte by byte, and cut in two at every position."""
    cuts = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    return cuts + [[stream[:i], stream[i:]] for i in range(1, len(stream))]


@pytest.mark.parametrize("stream", STREAMS)
def test_feed_bytes_gives_what_feed_gives_without_parsing(stream: bytes) -> None:
    for pieces in _splits(stream):
        parsed, raw = EventSplitter(), EventSplitter()
        events = [e for piece in pieces for e in parsed.feed(piece)] + parsed.finish()
        expected = b"".join(e.raw for e in events if not e.done)
        got = b"".join(raw.feed_bytes(piece) for piece in pieces)
        got += b"".join(e.raw for e in raw.finish(parse_data=False) if not e.done)
        assert got == expected, pieces
    assert b"[DONE]\n" not in expected


@pytest.mark.parametrize(
    "bad",
    [
        b"%%% not server-sent events %%%\n\n",
        CHUNK + b"\nnot a field\n\n",
        CHUNK + b"\n\ndatax: 1\n\n",
        b"<html>\n\n",
    ],
)
def test_feed_bytes_refuses_lines_that_are_not_sse(bad: bytes) -> None:
    for pieces in _splits(CHUNK + b"\n\n" + bad):
        splitter = EventSplitter()
        with pytest.raises(InvalidSSE):
            for piece in pieces:
                splitter.feed_bytes(piece)


def test_stream_with_many_events_per_read_keeps_every_event_once(
    upstream: FakeUpstream, make_proxy: MakeProxy
) -> None:
    # No delay: the events reach the proxy several to a read, and go on together.
    upstream.enqueue(Reply(chunks=[f"w{i} " for i in range(200)]))
    proxy = make_proxy({"local": upstream})
    text = httpx.post(f"{proxy.url}/v1/chat/completions", json={**ST_BODY, "stream": True}).text
    events = [e for e in text.split("\n\n") if e]
    assert events.count("data: [DONE]") == 1 and events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert "".join(p for p in pieces if p) == "".join(f"w{i} " for i in range(200))


# -- compressed upstream answers are relayed decoded ------------------------------------


async def _gzip_upstream(scope, receive, send) -> None:
    """An upstream that gzips every answer (as some gateways do)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"].endswith("/chat/completions"):
        body = b"".join([CHUNK + b"\n\n"] * 3) + b"data: [DONE]\n\n"
        kind = b"text/event-stream"
    else:
        body, kind = b'{"object": "list", "data": [{"id": "zipped"}]}', b"application/json"
    packed = gzip.compress(body)
    headers = [(b"content-type", kind), (b"content-encoding", b"gzip")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    half = len(packed) // 2
    await send({"type": "http.response.body", "body": packed[:half], "more_body": True})
    await send({"type": "http.response.body", "body": packed[half:]})


def test_compressed_upstream_answers_are_relayed_decoded(make_proxy: MakeProxy) -> None:
    with run_server(_gzip_upstream, lifespan="off") as gzipped:
        proxy = make_proxy({"local": f"{gzipped.url}/v1"})
        streamed = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={**ST_BODY, "stream": True},
            headers={"accept-encoding": "identity"},
        )
        passed = httpx.get(f"{proxy.url}/v1/files", headers={"accept-encoding": "identity"})
        models = httpx.get(f"{proxy.url}/v1/models")
    assert "content-encoding" not in streamed.headers
    assert streamed.text == (CHUNK.decode() + "\n\n") * 3 + "data: [DONE]\n\n"
    assert "content-encoding" not in passed.headers
    assert passed.json()["data"] == [{"id": "zipped"}]
    assert [m["id"] for m in models.json()["data"]] == ["zipped"]


# -- odd and broken upstream replies: relayed as sent, memory reads what it can ----------


def _delta(delta: object) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"


def _memory_proxy(make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path) -> RunningServer:
    memory = {"enabled": True, "database": str(tmp_path / "memory.db")}
    embeddings = {"backend": "upstream", "upstream": "local", "model": "fake-model"}
    return make_proxy({"local": upstream}, memory=memory, embeddings=embeddings)


def _ask(proxy: RunningServer, scope: str, *, stream: bool) -> httpx.Response:
    body = st_body([("user", f"Speak, {scope}.")], stream=stream)
    return httpx.post(
        f"{proxy.url}/v1/chat/completions", json=body, headers={"X-Memory-Scope": scope}
    )


def _reply_of(tmp_path: Path, scope: str) -> MessageRow | None:
    """The stored assistant reply of the scope's last turn, waiting a little for it."""

    def stored() -> bool:
        return any(r.content == f"Speak, {scope}." for r in transcript_of(db, scope))

    db = tmp_path / "memory.db"
    wait_until(stored, what="the turn to be stored")
    rows = transcript_of(db, scope)
    last_user = max(i for i, r in enumerate(rows) if r.role == "user")
    replies = [r for r in rows[last_user + 1 :] if r.role == "assistant"]
    return replies[-1] if replies else None


ODD_CHUNKS = [
    _delta("oops"),  # a delta that is a string
    _delta({"tool_calls": [{"index": 0, "id": "c1", "function": "f(x)"}]}),
    _delta({"tool_calls": [{"index": {"n": 1}, "function": {"name": "g"}}]}),
    _delta({"tool_calls": "xyz"}),
    b'data: {"choices": 5}\n\n',
]


def test_odd_stream_chunks_are_relayed_as_sent_and_memory_skips_them(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    stream = _delta({"role": "assistant", "content": "Hello"}), *ODD_CHUNKS
    stream += (_delta({"content": " there."}), b"data: [DONE]\n\n")
    upstream.enqueue(Reply(raw=list(stream)))
    proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    response = _ask(proxy, "odd", stream=True)
    assert response.text == b"".join(stream).decode()  # every byte, ending with [DONE]
    reply = _reply_of(tmp_path, "odd")
    assert reply is not None and reply.state == "active"
    assert reply.content == "Hello there." and "tool_calls" not in reply.raw


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        ({"choices": [{"index": 0, "message": "hello"}]}, None),
        ({"choices": 5}, None),
        ({"choices": [{"index": 0, "message": {"content": "Hi.", "tool_calls": "xyz"}}]}, "Hi."),
    ],
)
def test_odd_whole_replies_pass_through_and_memory_skips_what_it_cannot_read(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, body: dict, stored: str | None
) -> None:
    raw = json.dumps(body).encode()
    upstream.enqueue(Reply(raw=[raw]))
    proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    response = _ask(proxy, "whole", stream=False)
    assert response.status_code == 200 and response.content == raw
    reply = _reply_of(tmp_path, "whole")
    if stored is None:
        assert reply is None
    else:
        assert reply is not None and reply.content == stored and "tool_calls" not in reply.raw


def test_an_error_event_in_the_stream_stores_the_reply_as_partial(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    error = b'data: {"error": {"message": "context overflow"}}\n\n'
    upstream.enqueue(Reply(raw=[_delta({"role": "assistant", "content": "start"}), error]))
    proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    response = _ask(proxy, "overflow", stream=True)
    assert response.text.endswith(error.decode() + "data: [DONE]\n\n")
    reply = _reply_of(tmp_path, "overflow")
    assert reply is not None and (reply.content, reply.state) == ("start", "partial")


GOOD = _delta({"role": "assistant", "content": "Before bad."})


@pytest.mark.parametrize("reads", [1, 2])
@pytest.mark.parametrize(
    ("bad", "memory"),
    [
        (b"data: {not json\n\n", True),  # only a relay that reads the events sees this
        (b"%%% not server-sent events %%%\n\n", True),
        (b"%%% not server-sent events %%%\n\n", False),
    ],
)
def test_good_events_before_a_bad_one_are_relayed_however_the_reads_split(
    upstream: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    bad: bytes,
    memory: bool,
    reads: int,
) -> None:
    pieces = [GOOD + bad] if reads == 1 else [GOOD, bad]
    upstream.enqueue(Reply(raw=pieces, delay_between=0.2))
    if memory:
        proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    else:
        proxy = make_proxy({"local": upstream})
    events = [e for e in _ask(proxy, "bad", stream=True).text.split("\n\n") if e]
    assert events[0] + "\n\n" == GOOD.decode()
    assert "invalid stream" in json.loads(events[1][len("data: ") :])["error"]["message"]
    assert events[2:] == ["data: [DONE]"]
    if memory:
        reply = _reply_of(tmp_path, "bad")
        assert reply is not None and (reply.content, reply.state) == ("Before bad.", "partial")


@pytest.mark.parametrize(
    ("bad", "modes"),
    [
        (b"data: {not json\n\n", (True,)),  # seen only where the data is parsed
        (b"%%% not sse\n\n", (True, False)),
        (b"data: " + b"x" * 2 * len(CHUNK), (True, False)),  # an event past the limit
    ],
)
def test_splitter_gives_the_events_before_a_bad_one_with_the_fault(
    bad: bytes, modes: tuple[bool, ...]
) -> None:
    for pieces in _splits(CHUNK + b"\n\n" + bad):
        for parse in modes:
            splitter, got = EventSplitter(max_event_bytes=len(CHUNK) + 2), b""
            with pytest.raises(InvalidSSE) as fault:
                for piece in pieces:
                    if parse:
                        got += b"".join(e.raw for e in splitter.feed(piece))
                    else:
                        got += splitter.feed_bytes(piece)
            got += b"".join(e.raw for e in fault.value.before)
            assert got == CHUNK + b"\n\n", (pieces, parse)


# -- the upstream's Content-Type, not the request's `stream`, picks the relay ----------

WHOLE = json.dumps(
    {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "Whole."}}]}
).encode()
EVENTS = [_delta({"role": "assistant", "content": "Streamed"}), _delta({"content": " anyway."})]


@pytest.mark.parametrize("memory", [True, False])
def test_a_whole_reply_to_a_stream_request_passes_through_and_is_stored(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, memory: bool
) -> None:
    upstream.enqueue(Reply(raw=[WHOLE], headers={"Content-Type": "application/json"}))
    if memory:
        proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    else:
        proxy = make_proxy({"local": upstream})
    response = _ask(proxy, "whole-to-stream", stream=True)
    assert response.status_code == 200 and response.content == WHOLE
    assert response.headers["content-type"] == "application/json"
    if memory:
        reply = _reply_of(tmp_path, "whole-to-stream")
        assert reply is not None and (reply.content, reply.state) == ("Whole.", "active")


@pytest.mark.parametrize("memory", [True, False])
def test_an_event_stream_to_a_whole_request_is_relayed_and_stored(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, memory: bool
) -> None:
    stream = [*EVENTS, b"data: [DONE]\n\n"]
    upstream.enqueue(Reply(raw=stream, headers={"Content-Type": "text/event-stream"}))
    if memory:
        proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    else:
        proxy = make_proxy({"local": upstream})
    response = _ask(proxy, "stream-to-whole", stream=False)
    assert response.status_code == 200 and response.content == b"".join(stream)
    assert response.headers["content-type"].startswith("text/event-stream")
    if memory:
        reply = _reply_of(tmp_path, "stream-to-whole")
        assert reply is not None and (reply.content, reply.state) == ("Streamed anyway.", "active")


def test_a_whole_reply_that_is_not_json_passes_through_as_sent(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream.enqueue(Reply(raw=[b"plain words"], headers={"Content-Type": "text/plain"}))
    proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    response = _ask(proxy, "plain", stream=False)
    assert (response.status_code, response.content) == (200, b"plain words")
    assert response.headers["content-type"] == "text/plain"
    assert _reply_of(tmp_path, "plain") is None  # the turn is kept, the reply unread


def test_a_whole_reply_without_a_content_type_is_not_called_json(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream.enqueue(Reply(raw=[b"data: what is this"], headers={"Content-Type": None}))
    proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    response = _ask(proxy, "untyped", stream=False)
    assert (response.status_code, response.content) == (200, b"data: what is this")
    assert "content-type" not in response.headers  # as it came: no type claimed


NOT_UTF8 = b'{"choices": [{"index": 0, "%s": {"content": "caf\xe9"}}]}'


@pytest.mark.parametrize("stream", [True, False])
def test_bytes_that_are_not_utf8_reach_the_client_unchanged(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, stream: bool
) -> None:
    if stream:
        body = [b"data: " + NOT_UTF8 % b"delta" + b"\n\n", b"data: [DONE]\n\n"]
    else:
        body = [NOT_UTF8 % b"message"]
    upstream.enqueue(Reply(raw=body))
    proxy = _memory_proxy(make_proxy, upstream, tmp_path)
    response = _ask(proxy, "latin", stream=stream)
    assert response.status_code == 200 and response.content == b"".join(body)
    reply = _reply_of(tmp_path, "latin")  # stored with U+FFFD for the byte it cannot read
    assert reply is not None and (reply.content, reply.state) == ("caf\ufffd", "active")
