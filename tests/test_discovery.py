"""Finding local model servers, and how large a context each model really has.

Every server is real: the fake upstream in its llama.cpp, Ollama and LM Studio
flavors, and small inline apps for the shapes the fake does not speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.discovery import (
    OLLAMA_DEFAULT_CONTEXT,
    FoundServer,
    context_window,
    describe_servers,
    probe_local_servers,
)
from proxy.upstreams.registry import Upstream
from proxy.upstreams.windows import ContextWindows, Window
from tests.fakes.servers import RunningServer, run_server
from tests.fakes.upstream import FakeUpstream


def window(
    base_url: str, model: str | None, *, api_key: str | None = None, timeout: float = 2.0
) -> tuple[int, str] | None:
    """`context_window` for the server at `base_url`, through a pool of its own."""
    upstream = Upstream(name="local", base_url=base_url, api_key=api_key)

    async def ask() -> tuple[int, str] | None:
        pool = UpstreamPool({"local": upstream})
        try:
            return await context_window(pool, upstream, model, timeout=timeout)
        finally:
            await pool.aclose()

    return asyncio.run(ask())


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(routes: list[Route]) -> Iterator[RunningServer]:
    """A small Starlette app on a real socket."""
    with run_server(Starlette(routes=routes)) as server:
        yield server


# -- llama.cpp ------------------------------------------------------------------------------


def test_llamacpp_window_is_n_ctx_from_props() -> None:
    with FakeUpstream("llamacpp", context_window=6144) as up:
        assert window(up.base_url, "fake-model") == (6144, "llama.cpp /props n_ctx")
        assert window(up.base_url, None) == (6144, "llama.cpp /props n_ctx")
        assert "/props" in {r.path for r in up.requests}


def test_llamacpp_training_context_in_model_list_is_not_the_window() -> None:
    """llama.cpp lists meta.n_ctx_train (131072 here) in /v1/models: what the model was
    trained on, not what the server was started with; only /props tells the latter."""
    with FakeUpstream("llamacpp", context_window=4096) as up:
        found = window(up.base_url, "fake-model")
        assert found is not None and found[0] == 4096
        listed = [r for r in up.requests if r.path == "/v1/models"]
        assert listed  # the model list was read, and its n_ctx_train ignored


def test_llamacpp_props_with_top_level_n_ctx() -> None:
    """Some llama.cpp builds put n_ctx at the top of /props."""

    async def props(request: Request) -> JSONResponse:
        return JSONResponse({"n_ctx": 3072, "total_slots": 1})

    with serve([Route("/props", props)]) as server:
        assert window(f"{server.url}/v1", None) == (3072, "llama.cpp /props n_ctx")


def test_discovery_requests_carry_the_upstreams_key() -> None:
    with FakeUpstream("llamacpp", context_window=2048) as up:
        assert window(up.base_url, "fake-model", api_key="sk-local")
        assert {r.headers.get("authorization") for r in up.requests} == {"Bearer sk-local"}


# -- Ollama -------------------------------------------------------------------------------


def test_ollama_without_num_ctx_runs_at_its_default_window() -> None:
    """The model could take 32768 tokens, but Ollama serves 4096 unless told otherwise:
    assuming more would let Ollama's /v1 layer silently cut the prompt."""
    with FakeUpstream("ollama", context_window=32768) as up:
        found = window(up.base_url, "fake-model")
        assert found is not None
        assert found[0] == OLLAMA_DEFAULT_CONTEXT == 4096
        assert "default" in found[1]
        show = [r for r in up.requests if r.path == "/api/show"]
        assert show and show[0].json["model"] == "fake-model"


def test_ollama_model_trained_below_the_default_uses_its_own_window() -> None:
    with FakeUpstream("ollama", context_window=2048) as up:
        found = window(up.base_url, "fake-model")
        assert found is not None and found[0] == 2048


def test_ollama_finds_model_tagged_latest() -> None:
    with FakeUpstream("ollama", context_window=32768, models=["llama3:latest"]) as up:
        found = window(up.base_url, "llama3")
        assert found is not None and found[0] == 4096


def test_ollama_unknown_or_missing_model_gives_no_window() -> None:
    with FakeUpstream("ollama", context_window=32768) as up:
        assert window(up.base_url, "no-such-model") is None
        assert window(up.base_url, None) is None  # /api/show needs a model name


def ollama_app(parameters: str, running: list[dict] | None) -> list[Route]:
    """An Ollama whose /api/show has these Modelfile `parameters`, and /api/ps these models
    (None: no /api/ps at all, as on old versions)."""

    async def show(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "parameters": parameters,
                "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            }
        )

    async def ps(request: Request) -> JSONResponse:
        return JSONResponse({"models": running})

    routes = [Route("/api/show", show, methods=["POST"])]
    if running is not None:
        routes.append(Route("/api/ps", ps))
    return routes


def test_ollama_running_model_reports_its_context_in_api_ps() -> None:
    running = [
        {"name": "other:latest", "context_length": 2048},
        {"name": "llama3:latest", "context_length": 16384},
    ]
    with serve(ollama_app('stop "<|eot_id|>"\nnum_ctx 8192', running)) as server:
        assert window(f"{server.url}/v1", "llama3") == (16384, "Ollama /api/ps context_length")


def test_ollama_modelfile_num_ctx_when_the_model_is_not_loaded() -> None:
    params = 'stop "<|eot_id|>"\nnum_ctx                        12288\ntemperature 0.7'
    with serve(ollama_app(params, running=[])) as server:
        assert window(f"{server.url}/v1", "llama3") == (12288, "Ollama Modelfile num_ctx")
    with serve(ollama_app(params, running=None)) as server:  # an Ollama without /api/ps
        assert window(f"{server.url}/v1", "llama3") == (12288, "Ollama Modelfile num_ctx")


# -- LM Studio, vLLM, plain OpenAI ----------------------------------------------------------


def test_lmstudio_window_from_api_v0_models() -> None:
    with FakeUpstream("lmstudio", context_window=24576, models=["qwen", "phi"]) as up:
        expected = (24576, "LM Studio /api/v0/models max_context_length")
        assert window(up.base_url, "phi") == expected
        assert window(up.base_url, None) == expected
        assert window(up.base_url, "not-listed") is None


def test_lmstudio_loaded_context_wins_over_the_maximum() -> None:
    async def models(request: Request) -> JSONResponse:
        entry = {"id": "qwen", "max_context_length": 32768, "loaded_context_length": 8192}
        return JSONResponse({"data": [entry]})

    with serve([Route("/api/v0/models", models)]) as server:
        found = window(f"{server.url}/v1", "qwen")
        assert found == (8192, "LM Studio /api/v0/models loaded_context_length")


def test_vllm_max_model_len_in_the_model_list() -> None:
    async def models(request: Request) -> JSONResponse:
        data = [{"id": "small", "max_model_len": 4096}, {"id": "big", "max_model_len": 65536}]
        return JSONResponse({"object": "list", "data": data})

    with serve([Route("/v1/models", models)]) as server:
        assert window(f"{server.url}/v1", "big") == (65536, "vllm /v1/models max_model_len")


def test_plain_openai_server_does_not_tell() -> None:
    with FakeUpstream("openai", context_window=8192) as up:
        assert window(up.base_url, "fake-model") is None
        assert window(up.base_url, None) is None


def test_server_that_answers_garbage_does_not_tell() -> None:
    async def garbage(request: Request) -> PlainTextResponse:
        return PlainTextResponse("<html>not json</html>")

    async def odd(request: Request) -> JSONResponse:
        return JSONResponse({"default_generation_settings": {"n_ctx": "many"}, "n_ctx": -1})

    routes = [
        Route("/v1/models", garbage),
        Route("/props", odd),
        Route("/api/v0/models", garbage),
        Route("/api/show", garbage, methods=["POST"]),
    ]
    with serve(routes) as server:
        assert window(f"{server.url}/v1", "m") is None


def test_unreachable_or_silent_server_gives_none_within_the_timeout() -> None:
    assert window(f"http://127.0.0.1:{closed_port()}/v1", "m") is None
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        started = time.monotonic()
        assert window(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m", timeout=0.2) is None
        assert time.monotonic() - started < 3.0


# -- probing the usual local ports ---------------------------------------------------------


def test_probe_finds_the_server_that_answers_and_skips_a_closed_port() -> None:
    with FakeUpstream("llamacpp", models=["qwen2.5-7b", "phi-3"]) as up:
        found = asyncio.run(probe_local_servers([("ollama", closed_port()), ("llamacpp", up.port)]))
        assert found == [FoundServer("llamacpp", up.base_url, ("qwen2.5-7b", "phi-3"))]
        assert describe_servers(found) == [f"llamacpp at {up.base_url} (qwen2.5-7b, phi-3)"]


def test_probe_keeps_the_order_given_and_finds_several() -> None:
    with FakeUpstream("ollama") as ollama, FakeUpstream("lmstudio", models=["m"]) as lms:
        servers = [("lmstudio", lms.port), ("textgen", closed_port()), ("ollama", ollama.port)]
        found = asyncio.run(probe_local_servers(servers))
        assert [(f.kind, f.base_url) for f in found] == [
            ("lmstudio", lms.base_url),
            ("ollama", ollama.base_url),
        ]


def test_probe_ignores_a_port_that_is_not_a_model_server() -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello", status_code=200)

    with serve([]) as not_found, serve([Route("/v1/models", page)]) as not_json:
        found = asyncio.run(probe_local_servers([("a", not_found.port), ("b", not_json.port)]))
        assert found == []


def test_probe_with_nothing_listening_is_quick() -> None:
    started = time.monotonic()
    assert asyncio.run(probe_local_servers([("x", closed_port()), ("y", closed_port())])) == []
    assert time.monotonic() - started < 2.0


def test_probe_does_not_wait_for_a_silent_port_beyond_its_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        started = time.monotonic()
        servers = [("x", silent.getsockname()[1])]
        assert asyncio.run(probe_local_servers(servers, timeout=0.2)) == []
        assert time.monotonic() - started < 2.0


def test_describe_servers_shortens_long_model_lists() -> None:
    many = FoundServer("ollama", "http://127.0.0.1:11434/v1", tuple(f"m{i}" for i in range(7)))
    none = FoundServer("textgen", "http://127.0.0.1:5000/v1", ())
    assert describe_servers([many, none]) == [
        "ollama at http://127.0.0.1:11434/v1 (m0, m1, m2, m3, m4 ...)",
        "textgen at http://127.0.0.1:5000/v1 (no models listed)",
    ]


@pytest.mark.parametrize("flavor", ["llamacpp", "ollama", "lmstudio", "openai"])
def test_every_flavor_is_found_by_the_probe(flavor: str) -> None:
    with FakeUpstream(flavor) as up:
        found = asyncio.run(probe_local_servers([(flavor, up.port)]))
        assert [(f.kind, f.models) for f in found] == [(flavor, ("fake-model",))]


def test_a_server_that_came_up_after_the_first_lookup_is_asked_again_soon() -> None:
    # llama.cpp still loading when the first chat came: the default must not stick.
    port = closed_port()
    upstream = Upstream(name="local", base_url=f"http://127.0.0.1:{port}/v1")

    async def lookups() -> tuple[Window, Window, Window]:
        pool = UpstreamPool({"local": upstream})
        windows = ContextWindows(pool, 8192, unknown_ttl=0.2)
        try:
            before = await windows.get(upstream, "m")
            with FakeUpstream(flavor="llamacpp", context_window=2048, port=port):
                cached = await windows.get(upstream, "m")
                await asyncio.sleep(0.3)
                return before, cached, await windows.get(upstream, "m")
        finally:
            await pool.aclose()

    before, cached, after = asyncio.run(lookups())
    assert before == cached == Window(8192, "default")
    assert after == Window(2048, "llama.cpp /props n_ctx")
