"""A fake OpenAI-compatible model server on a real socket, scriptable from sync tests.

    with FakeUpstream() as up:
        up.enqueue(Reply("Hi there.", delay_between=0.05))
        client = openai.OpenAI(base_url=up.base_url, api_key="sk-test")
        ...
        assert up.last["messages"][-1]["content"] == "hello"

It speaks the wire format of OpenAI's chat/completions (JSON and SSE, `n`, tool calls,
`stream_options.include_usage`), legacy completions, embeddings and models, and the
server-info endpoints of llama.cpp (`/props`), Ollama (`/api/show`) and LM Studio
(`/api/v0/models`) for context-window discovery. It records every request, and notices
at once when a client goes away mid-answer, because it listens for `http.disconnect`
while it answers instead of waiting for a write to fail.

Run alone for benchmarks: `python -m tests.fakes.upstream --port 9100 --chunks 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import random
import re
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.fakes.servers import RunningServer, run_server

DEFAULT_TEXT = "Hello from the fake upstream."
FLAVORS = ("openai", "llamacpp", "ollama", "lmstudio")

# Not SSE framing, and a data line that is not JSON: what a broken server might send.
_GARBAGE = b"%%% this is not server-sent events %%%\ndata: {not json at all\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


@dataclass
class Reply:
    """What the fake answers to one generation request (chat or legacy completions)."""

    text: str = DEFAULT_TEXT
    chunks: list[str] | None = None  # stream pieces; default: `text` split into words
    delay_first: float = 0.0  # seconds before the first byte (headers too)
    delay_between: float = 0.0  # seconds between pieces (a non-stream answer waits the sum)
    status: int = 200
    error_body: dict[str, Any] | None = None  # body of a non-200 answer
    fail_after: int | None = None  # drop the connection after this many pieces
    invalid_sse: bool = False  # garbage after the first piece (non-stream: a non-JSON body)
    hang: bool = False  # never answer; wait for the client to go away
    usage: dict[str, Any] | None = None  # keys override the computed usage
    tool_calls: list[dict[str, Any]] | None = None  # assistant tool calls, as OpenAI has them
    finish_reason: str | None = None  # default: "tool_calls" with tool calls, else "stop"
    extra_chunk_fields: dict[str, Any] = field(default_factory=dict)  # e.g. llama.cpp timings
    # Extra response headers; a None value leaves that header out (with `raw`, "Content-Type":
    # None sends no Content-Type at all).
    headers: dict[str, str | None] = field(default_factory=dict)
    # The body as these pieces, sent as they are (one write each), instead of an answer
    # of its own: SSE for a stream, else JSON, unless `headers` names a Content-Type
    # (an upstream that answers otherwise than asked). For upstreams that send odd things.
    raw: list[bytes] | None = None

    def pieces(self) -> list[str]:
        """The content pieces as streamed; joined they equal `text` unless `chunks` is set."""
        if self.chunks is not None:
            return list(self.chunks)
        return split_words(self.text)

    def content(self) -> str:
        """The full answer text: the pieces joined."""
        return "".join(self.pieces())


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any  # the parsed body, or None when it is not JSON
    received_at: float  # time.monotonic()
    disconnected_at: float | None = None  # when the client went away mid-answer


class FakeUpstream:
    """An OpenAI-compatible server for tests: a raw ASGI app plus its scripting surface.

    Generation requests take, in order of precedence, `responder(body)` when set, the
    next queued reply (`enqueue`), or `default`. `flavor` picks which server-info
    endpoints exist ("openai": none; "llamacpp": /props, /health; "ollama": /api/show,
    /api/tags, /api/version, /; "lmstudio": /api/v0/models, /api/v1/models), each
    reporting `context_window`; the others answer 404. `models`, `embedding_dim` and
    `architecture` (Ollama's) may be changed while it runs; `/v1/embeddings` answers only
    while `embeddings_open` is set (clear it to stand for a model still loading). A
    client that goes away before the answer is fully written is appended to
    `disconnects` and sets the `disconnected` event. `record=False` keeps no requests
    (long benchmarks). `reject_stream_options` answers 400 to a chat request that has
    `stream_options`, as older servers do with a field they do not know.
    """

    def __init__(
        self,
        flavor: str = "openai",
        context_window: int = 4096,
        *,
        models: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        reject_stream_options: bool = False,
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, not {flavor!r}")
        self.flavor = flavor
        self.context_window = context_window
        self.models = list(models or ["fake-model"])
        self.architecture = "llama"  # Ollama's general.architecture
        self.reject_stream_options = reject_stream_options
        self.embedding_dim = 16
        self.embeddings_open = threading.Event()
        self.embeddings_open.set()
        self.default = Reply()
        self.responder: Callable[[Any], Reply | str] | None = None
        self.disconnected = threading.Event()
        self._host, self._port, self._record_requests = host, port, record
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[Reply] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._disconnects: list[RecordedRequest] = []
        self._responder_errors: list[BaseException] = []
        self._ids = itertools.count(1)
        self._inflight: set[asyncio.Task[None]] = set()  # touched only on the server's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stack: contextlib.ExitStack | None = None
        self._running: RunningServer | None = None
        self._routes = self._build_routes()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Start serving on a real socket (a background uvicorn thread)."""
        if self._running is not None:
            raise RuntimeError("FakeUpstream is already running")
        hide_dropped_connections()
        stack = contextlib.ExitStack()
        self._running = stack.enter_context(run_server(self, self._host, self._port))
        self._stack = stack
        return self

    def close(self) -> None:
        """Stop the server. Raises what a test's `responder` raised, if it raised."""
        self._shutdown()
        errors, self._responder_errors = self._responder_errors, []
        if errors:
            raise errors[0]

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._stack is None:
            return
        loop = self._loop
        if loop is not None:
            # Answers still in flight (hangs, slow streams) end at once, not after
            # uvicorn's graceful-shutdown timeout.
            with contextlib.suppress(RuntimeError):  # the loop may be gone already
                loop.call_soon_threadsafe(self._cancel_inflight)
        stack, self._stack, self._running = self._stack, None, None
        stack.close()

    def _cancel_inflight(self) -> None:
        for task in list(self._inflight):
            task.cancel()

    @property
    def url(self) -> str:
        """The server's root URL, e.g. "http://127.0.0.1:54321"."""
        if self._running is None:
            raise RuntimeError("FakeUpstream is not running; use `with FakeUpstream() as up:`")
        return self._running.url

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: `url` + "/v1"."""
        return self.url + "/v1"

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._running is None:
            raise RuntimeError("FakeUpstream is not running")
        return self._running.port

    # -- scripting and inspection --------------------------------------------------------

    def enqueue(self, *replies: Reply | str) -> None:
        """Queue replies for the next generation requests, in order (str: Reply(text))."""
        with self._lock:
            self._queue.extend(_as_reply(r) for r in replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (a snapshot)."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The chat-completions requests received so far."""
        with self._lock:
            return [r for r in self._requests if r.path == "/v1/chat/completions"]

    @property
    def last(self) -> Any:
        """The parsed body of the last chat-completions request, or None."""
        chats = self.chat_requests
        return chats[-1].json if chats else None

    @property
    def disconnects(self) -> list[RecordedRequest]:
        """The requests whose client went away before the answer was complete."""
        with self._lock:
            return list(self._disconnects)

    def wait_for_chat_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least `count` chat requests arrived (e.g. from background jobs)."""
        path = "/v1/chat/completions"
        with self._changed:
            done = self._changed.wait_for(
                lambda: sum(r.path == path for r in self._requests) >= count, timeout
            )
        chats = self.chat_requests
        if not done:
            raise TimeoutError(
                f"expected {count} chat requests within {timeout} s, got {len(chats)}"
            )
        return chats

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._loop = asyncio.get_running_loop()
        body = await _read_body(receive)
        if body is None:  # the client left before sending its request
            return
        request = self._record(scope, body)
        handler = self._routes.get((request.method, request.path))
        if handler is None and request.method == "GET" and request.path.startswith("/v1/models/"):
            handler = self._model
        if handler is None:
            await _send_json(send, 404, _error(f"no route {request.method} {request.path}", 404))
            return
        await handler(request, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _record(self, scope: Message, body: bytes) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):  # answered as a body that is not JSON
            parsed = None
        request = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
            json=parsed,
            received_at=time.monotonic(),
        )
        if self._record_requests:
            with self._changed:
                self._requests.append(request)
                self._changed.notify_all()
        return request

    def _build_routes(self) -> dict[tuple[str, str], Callable[..., Awaitable[None]]]:
        routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._legacy,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
        }
        info: dict[str, dict[tuple[str, str], Callable[[], Any]]] = {
            "llamacpp": {("GET", "/props"): self._props, ("GET", "/health"): _health},
            "ollama": {
                ("GET", "/api/tags"): self._ollama_tags,
                ("GET", "/api/version"): _ollama_version,
            },
            "lmstudio": {
                ("GET", "/api/v0/models"): self._lmstudio_v0,
                ("GET", "/api/v1/models"): self._lmstudio_v1,
            },
        }
        for key, build in info.get(self.flavor, {}).items():
            routes[key] = _json_route(build)
        if self.flavor == "ollama":
            routes[("POST", "/api/show")] = self._ollama_show
            routes[("GET", "/")] = _ollama_root
        return routes

    # -- generation ----------------------------------------------------------------------

    async def _chat(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        body = request.json
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await _send_json(send, 400, _error("the body must be JSON with a 'messages' list", 400))
            return
        if self.reject_stream_options and "stream_options" in body:
            message = "Unrecognized request argument supplied: stream_options"
            await _send_json(send, 400, _error(message, 400))
            return
        reply = self._next_reply(body)
        wire = _Wire(self, body, chat=True)
        await self._guarded(receive, request, self._answer(send, reply, wire))

    async def _legacy(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        body = request.json
        if not isinstance(body, dict) or "prompt" not in body:
            await _send_json(send, 400, _error("the body must be JSON with a 'prompt'", 400))
            return
        reply = self._next_reply(body)
        wire = _Wire(self, body, chat=False)
        await self._guarded(receive, request, self._answer(send, reply, wire))

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        responder = self.responder
        if responder is not None:
            try:
                return _as_reply(responder(body))
            except Exception as exc:  # a bug in the test: answer 500, raise it at close()
                with self._lock:
                    self._responder_errors.append(exc)
                return Reply(status=500, error_body=_error(f"responder raised {exc!r}", 500))
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return _as_reply(self.default)

    async def _answer(self, send: Send, reply: Reply, wire: _Wire) -> None:
        if reply.hang:
            await asyncio.Future()  # until the client goes away or the server stops
        if reply.delay_first:
            await asyncio.sleep(reply.delay_first)
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in reply.headers.items()
            if v is not None
        ]
        if reply.status != 200:
            error = reply.error_body if reply.error_body is not None else _error(None, reply.status)
            await _send_json(send, reply.status, error, headers)
            return
        if reply.raw is not None:
            kind: list[tuple[bytes, bytes]] = []  # the reply's own Content-Type, if any
            if not any(name.lower() == "content-type" for name in reply.headers):
                kind = _SSE_HEADERS if wire.stream else [(b"content-type", b"application/json")]
            await send(_start(200, [*kind, *headers]))
            for index, piece in enumerate(reply.raw):
                if index and reply.delay_between:
                    await asyncio.sleep(reply.delay_between)
                await _send_more(send, piece)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        generation = _Generation(reply, wire)
        if wire.stream:
            await _stream(send, reply, generation.events(), headers)
            return
        steps = len(generation.steps)
        if reply.delay_between and steps > 1:  # as long as the stream would have taken
            await asyncio.sleep(reply.delay_between * (steps - 1))
        data = _GARBAGE if reply.invalid_sse else _dumps(generation.whole())
        if reply.fail_after is not None:  # headers, half the body, then a dead connection
            await send(_start(200, [*_json_headers(len(data)), *headers]))
            await send(
                {"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True}
            )
            raise _DropConnection
        await send(_start(200, [*_json_headers(len(data)), *headers]))
        await send({"type": "http.response.body", "body": data})

    async def _guarded(
        self, receive: Receive, request: RecordedRequest, work: Awaitable[None]
    ) -> None:
        """Answer with `work` while listening for the client to go away.

        A proxy that drops its upstream request is seen at once, even while the answer
        is sleeping between pieces; the answer is then cancelled.
        """
        answer = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        self._inflight.add(answer)
        try:
            await asyncio.wait((answer, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            answer.cancel()
            watcher.cancel()
            raise
        finally:
            self._inflight.discard(answer)
        if answer.done() and not answer.cancelled():
            watcher.cancel()
            error = answer.exception()
            if error is None:
                return
            if not watcher.done():
                raise error
        if watcher.done():  # the client went away before the answer was complete
            answer.cancel()
            await asyncio.wait((answer,))
            self._note_disconnect(request)
            return
        watcher.cancel()  # cancelled by close(): the server is going away
        raise _DropConnection

    def _note_disconnect(self, request: RecordedRequest) -> None:
        with self._lock:
            request.disconnected_at = time.monotonic()
            self._disconnects.append(request)
        self.disconnected.set()

    # -- other endpoints -----------------------------------------------------------------

    async def _embeddings(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        while not self.embeddings_open.is_set():  # polled: a cancelled wait must not hang
            await asyncio.sleep(0.01)
        body = request.json
        if not isinstance(body, dict) or "input" not in body:
            await _send_json(send, 400, _error("the body must be JSON with an 'input'", 400))
            return
        raw = body["input"]
        single = isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int))
        inputs = [raw] if single or not isinstance(raw, list) else raw
        texts = [item if isinstance(item, str) else json.dumps(item) for item in inputs]
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embed_text(text, self.embedding_dim)
            value: Any = vector
            if as_base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(len(t) for t in texts) // 4
        await _send_json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model") or self.models[0],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _model_entry(self, model_id: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": model_id, "object": "model", "created": 1700000000}
        entry["owned_by"] = "fake"
        if self.flavor == "llamacpp":
            # llama.cpp reports the training context here: not the served window (/props).
            entry["meta"] = {"n_ctx_train": max(131072, self.context_window), "n_vocab": 32000}
        return entry

    async def _models(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        data = [self._model_entry(m) for m in self.models]
        await _send_json(send, 200, {"object": "list", "data": data})

    async def _model(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        model_id = request.path.removeprefix("/v1/models/")
        if model_id not in self.models:
            await _send_json(send, 404, _error(f"The model '{model_id}' does not exist", 404))
            return
        await _send_json(send, 200, self._model_entry(model_id))

    def _props(self) -> dict[str, Any]:
        # The shape of llama-server's GET /props: the window is in the slot settings.
        return {
            "default_generation_settings": {
                "id": 0,
                "id_task": -1,
                "n_ctx": self.context_window,
                "is_processing": False,
                "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95},
            },
            "total_slots": 1,
            "model_path": f"/models/{self.models[0]}.gguf",
            "chat_template": "{{ messages }}",
            "build_info": "b0000-fake",
        }

    async def _ollama_show(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        body = request.json if isinstance(request.json, dict) else {}
        name = str(body.get("model") or body.get("name") or "")
        if name not in self.models and f"{name}:latest" not in self.models:
            await _send_json(send, 404, {"error": f"model '{name}' not found"})
            return
        arch = self.architecture
        show = {
            "modelfile": f"FROM {name}\n",
            "parameters": 'stop "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": arch,
                "families": [arch],
                "parameter_size": "1.0B",
                "quantization_level": "Q4_K_M",
            },
            "model_info": {
                "general.architecture": arch,
                "general.parameter_count": 1_000_000_000,
                f"{arch}.context_length": self.context_window,
                f"{arch}.embedding_length": 2048,
            },
            "capabilities": ["completion"],
            "modified_at": "2025-01-01T00:00:00Z",
        }
        await _send_json(send, 200, show)

    def _ollama_tags(self) -> dict[str, Any]:
        return {
            "models": [
                {"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z", "size": 1 << 30}
                for m in self.models
            ]
        }

    def _lmstudio_v0(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "type": "llm",
                    "publisher": "fake",
                    "arch": self.architecture,
                    "compatibility_type": "gguf",
                    "quantization": "Q4_K_M",
                    "state": "loaded",
                    "max_context_length": self.context_window,
                }
                for m in self.models
            ],
        }

    def _lmstudio_v1(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "type": "llm",
                    "publisher": "fake",
                    "key": m,
                    "display_name": m,
                    "architecture": self.architecture,
                    "loaded_instances": [
                        {"id": m, "config": {"context_length": self.context_window}}
                    ],
                    "max_context_length": self.context_window,
                    "format": "gguf",
                }
                for m in self.models
            ]
        }


# -- the wire format ----------------------------------------------------------------------


class _Wire:
    """Per-request facts shared by every chunk: id, model, choices, usage flag."""

    def __init__(self, up: FakeUpstream, body: dict[str, Any], *, chat: bool) -> None:
        self.chat = chat
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        n = body.get("n")
        self.n = n if isinstance(n, int) and n > 1 else 1
        self.model = body.get("model") or up.models[0]
        number = next(up._ids)
        self.id = f"chatcmpl-fake{number}" if chat else f"cmpl-fake{number}"
        self.created = int(time.time())
        self.prompt_chars = _prompt_chars(body) if chat else _text_chars(body.get("prompt"))


class _Generation:
    """One reply rendered for one request: a whole object or its stream of events."""

    def __init__(self, reply: Reply, wire: _Wire) -> None:
        self.reply, self.wire = reply, wire
        self.pieces = reply.pieces()
        self.tool_calls = _normalise_tool_calls(reply.tool_calls or [])
        self.steps: list[dict[str, Any]] = [{"content": p} for p in self.pieces]
        if wire.chat:
            for index, call in enumerate(self.tool_calls):
                fn = call["function"]
                head = {"index": index, "id": call["id"], "type": call["type"]}
                head["function"] = {"name": fn["name"], "arguments": ""}
                self.steps.append({"tool_calls": [head]})
                for fragment in split_words(fn["arguments"]):
                    piece = {"index": index, "function": {"arguments": fragment}}
                    self.steps.append({"tool_calls": [piece]})
        self.finish = reply.finish_reason or ("tool_calls" if self.tool_calls else "stop")
        completion = len(self.steps) * wire.n
        prompt = wire.prompt_chars // 4
        self.usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        self.usage.update(reply.usage or {})

    def whole(self) -> dict[str, Any]:
        """The non-streaming response object."""
        wire, text = self.wire, "".join(self.pieces)
        if wire.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tool_calls:
                message["tool_calls"] = self.tool_calls
                message["content"] = text or None
            choice: dict[str, Any] = {"message": message}
            kind = "chat.completion"
        else:
            choice, kind = {"text": text}, "text_completion"
        choices = [
            {"index": i, **choice, "logprobs": None, "finish_reason": self.finish}
            for i in range(wire.n)
        ]
        return {
            "id": wire.id,
            "object": kind,
            "created": wire.created,
            "model": wire.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
            "usage": self.usage,
        }

    def events(self) -> _Events:
        """The stream: opening chunks, one event group per piece, and the closing bytes."""
        wire = self.wire
        role = {"role": "assistant", "content": ""}
        opening = self._event([role] * wire.n) if wire.chat else b""  # legacy has no role
        steps = [self._event([step] * wire.n) for step in self.steps]
        closing = self._event([{}] * wire.n, finish=self.finish)
        if wire.include_usage:
            closing += self._event([], usage=self.usage)
        return _Events(opening, steps, closing + b"data: [DONE]\n\n")

    def _event(
        self, deltas: list[dict[str, Any]], finish: str | None = None, usage: Any = None
    ) -> bytes:
        """One SSE event per choice (several when n > 1), as bytes."""
        wire = self.wire
        out = []
        for index, delta in enumerate(deltas or [None]):
            if delta is None:  # the usage chunk: no choices at all
                choices: list[Any] = []
            elif wire.chat:
                choices = [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                ]
            else:
                text = delta.get("content", "")
                choices = [
                    {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                ]
            chunk: dict[str, Any] = {
                "id": wire.id,
                "object": "chat.completion.chunk" if wire.chat else "text_completion",
                "created": wire.created,
                "model": wire.model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if wire.include_usage:
                chunk["usage"] = usage
            chunk.update(self.reply.extra_chunk_fields)
            out.append(b"data: " + _dumps(chunk) + b"\n\n")
        return b"".join(out)


@dataclass
class _Events:
    opening: bytes
    steps: list[bytes]
    closing: bytes


async def _stream(send: Send, reply: Reply, events: _Events, headers: list[Any]) -> None:
    await send(_start(200, [*_SSE_HEADERS, *headers]))
    if events.opening:
        await _send_more(send, events.opening)
    for index, step in enumerate(events.steps):
        if reply.fail_after is not None and index >= reply.fail_after:
            raise _DropConnection
        if index and reply.delay_between:
            await asyncio.sleep(reply.delay_between)
        await _send_more(send, step)
        if index == 0 and reply.invalid_sse:
            await _send_more(send, _GARBAGE)
    if not events.steps and reply.invalid_sse:
        await _send_more(send, _GARBAGE)
    if reply.fail_after is not None:  # fewer pieces than fail_after: still no ending
        raise _DropConnection
    await send({"type": "http.response.body", "body": events.closing, "more_body": False})


# -- helpers ------------------------------------------------------------------------------


class _DropConnection(Exception):
    """Raised inside the app after the response started: uvicorn closes the socket."""


class _HideDropped(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, _DropConnection)


def hide_dropped_connections() -> None:
    """Keep uvicorn from logging a traceback for each connection the fake drops on purpose."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideDropped) for f in logger.filters):
        logger.addFilter(_HideDropped())


def split_words(text: str) -> list[str]:
    """Split text into word pieces, each with its leading whitespace; joined, they equal text."""
    return re.findall(r"\s*\S+|\s+$", text)


def embed_text(text: str, dim: int = 16) -> list[float]:
    """A deterministic unit vector for `text` (the same text always gives the same vector)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    rng = random.Random(seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _as_reply(reply: Reply | str) -> Reply:
    return Reply(text=reply) if isinstance(reply, str) else reply


def _normalise_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for index, call in enumerate(calls):
        fn = dict(call.get("function") or {})
        arguments = fn.get("arguments", "")
        fn["arguments"] = arguments if isinstance(arguments, str) else json.dumps(arguments)
        fn.setdefault("name", "tool")
        out.append(
            {"id": call.get("id") or f"call_fake{index}", "type": "function", "function": fn}
        )
    return out


def _prompt_chars(body: dict[str, Any]) -> int:
    return sum(_text_chars(m.get("content")) for m in body["messages"] if isinstance(m, dict))


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts, or a list of prompts
        return sum(
            _text_chars(part.get("text") if isinstance(part, dict) else part) for part in content
        )
    return 0


def _error(message: str | None, status: int) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    kinds.update({404: "not_found_error", 429: "rate_limit_error"})
    return {
        "error": {
            "message": message or f"fake upstream error (status {status})",
            "type": kinds.get(status, "server_error"),
            "param": None,
            "code": None,
        }
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _json_headers(length: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]


def _start(status: int, headers: list[Any]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


async def _send_more(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_json(send: Send, status: int, obj: Any, headers: list[Any] | None = None) -> None:
    data = _dumps(obj)
    await send(_start(status, [*_json_headers(len(data)), *(headers or [])]))
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive: Receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _until_disconnect(receive: Receive) -> None:
    # Once the body is read, uvicorn's receive() waits until the client disconnects
    # (or the response completes, which _guarded checks first).
    while (await receive())["type"] != "http.disconnect":
        pass


def _json_route(build: Callable[[], Any]) -> Callable[..., Awaitable[None]]:
    async def route(request: RecordedRequest, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, build())

    return route


def _health() -> dict[str, Any]:
    return {"status": "ok"}


def _ollama_version() -> dict[str, Any]:
    return {"version": "0.6.0"}


async def _ollama_root(request: RecordedRequest, receive: Receive, send: Send) -> None:
    data = b"Ollama is running"
    await send(_start(200, [(b"content-type", b"text/plain; charset=utf-8")]))
    await send({"type": "http.response.body", "body": data})


# -- standalone ---------------------------------------------------------------------------


def cycled_words(text: str, count: int) -> list[str]:
    """`count` pieces made of the words of `text`, cycled: the benchmark's reply shape."""
    words = text.split() or ["word"]
    return [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    """Serve a FakeUpstream forever, answering every request with one scripted reply."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.upstream", description=main.__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the reply text")
    parser.add_argument(
        "--chunks", type=int, help="stream exactly this many pieces (words of --text)"
    )
    parser.add_argument(
        "--delay-first", type=float, default=0.0, help="seconds before the first byte"
    )
    parser.add_argument("--delay-between", type=float, default=0.0, help="seconds between pieces")
    parser.add_argument("--flavor", choices=FLAVORS, default="openai")
    parser.add_argument("--context-window", type=int, default=4096)
    parser.add_argument("--model", action="append", help="a model id to list (repeatable)")
    args = parser.parse_args(argv)

    # Recording every request would grow without bound in a long benchmark.
    up = FakeUpstream(args.flavor, args.context_window, models=args.model, record=False)
    chunks = cycled_words(args.text, args.chunks) if args.chunks is not None else None
    up.default = Reply(
        text="".join(chunks) if chunks is not None else args.text,
        chunks=chunks,
        delay_first=args.delay_first,
        delay_between=args.delay_between,
    )
    hide_dropped_connections()
    config = uvicorn.Config(
        up,
        host=args.host,
        port=args.port,
        loop="auto",
        http="auto",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
