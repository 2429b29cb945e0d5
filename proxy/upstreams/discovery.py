"""What local model servers exist, and how large a context each model really has.

Each server kind tells its context window in its own way:
- vLLM lists `max_model_len` with each model in `/v1/models`;
- llama.cpp's server reports `n_ctx` at `/props` (the slot size it was started with);
- LM Studio lists `loaded_context_length` / `max_context_length` at `/api/v0/models`;
- Ollama: the running context is in `/api/ps` (`context_length`) for a loaded model, a
  Modelfile may set `num_ctx` (in `/api/show` `parameters`); otherwise Ollama runs with
  its default (4096 on most machines) even when the model could take more, and its `/v1`
  layer silently truncates longer prompts. So for Ollama we never assume more than the
  window it will actually use.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from proxy.errors import ProxyError
from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.registry import Upstream

OLLAMA_DEFAULT_CONTEXT = 4096

# (server kind, port): the usual places a local model server listens.
LOCAL_SERVERS: tuple[tuple[str, int], ...] = (
    ("ollama", 11434),
    ("lmstudio", 1234),
    ("llamacpp", 8080),
    ("textgen", 5000),
)


@dataclass(frozen=True)
class FoundServer:
    """A local server that answered `/v1/models`."""

    kind: str
    base_url: str
    models: tuple[str, ...]


async def probe_local_servers(
    servers: Iterable[tuple[str, int]] = LOCAL_SERVERS,
    *,
    host: str = "127.0.0.1",
    timeout: float = 0.5,
) -> list[FoundServer]:
    """Ask each usual local port for `/v1/models`; return the servers that answered."""

    async def probe(client: httpx.AsyncClient, kind: str, port: int) -> FoundServer | None:
        base = f"http://{host}:{port}/v1"
        try:
            response = await client.get(f"{base}/models")
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        return FoundServer(kind, base, tuple(_model_ids(data)))

    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        found = await asyncio.gather(*(probe(client, kind, port) for kind, port in servers))
    return [f for f in found if f is not None]


def _model_ids(listing: object) -> list[str]:
    data = listing.get("data") if isinstance(listing, dict) else None
    return [m["id"] for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def list_models(
    pool: UpstreamPool,
    upstream: Upstream,
    *,
    timeout: float,
    client_headers: Mapping[str, str] | None = None,
) -> list[dict]:
    """The upstream's `/v1/models` entries (dicts with at least an `id`)."""
    listing = await pool.fetch_json(
        upstream, "GET", upstream.url("models"), timeout=timeout, client_headers=client_headers
    )
    data = listing.get("data") if isinstance(listing, dict) else None
    return [m for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def context_window(
    pool: UpstreamPool, upstream: Upstream, model: str | None, *, timeout: float = 2.0
) -> tuple[int, str] | None:
    """The model's context window and where it came from, or None if the server won't say.

    Tries, in order: vLLM's `max_model_len`, llama.cpp's `/props`, LM Studio's
    `/api/v0/models`, Ollama's `/api/ps` and `/api/show`.
    """
    for probe in (_from_model_list, _from_llamacpp, _from_lmstudio, _from_ollama):
        try:
            found = await probe(pool, upstream, model, timeout)
        except (ProxyError, ValueError, KeyError, TypeError):
            continue
        if found:
            return found
    return None


async def _from_model_list(
    pool: UpstreamPool, upstream: Upstream, model: str | None, timeout: float
) -> tuple[int, str] | None:
    for entry in await list_models(pool, upstream, timeout=timeout):
        if (model is None or entry["id"] == model) and _positive(entry.get("max_model_len")):
            return int(entry["max_model_len"]), "vllm /v1/models max_model_len"
    return None


async def _from_llamacpp(
    pool: UpstreamPool, upstream: Upstream, model: str | None, timeout: float
) -> tuple[int, str] | None:
    props = await pool.fetch_json(upstream, "GET", f"{upstream.root_url}/props", timeout=timeout)
    if not isinstance(props, dict):
        return None
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    n_ctx = n_ctx or props.get("n_ctx")
    return (int(n_ctx), "llama.cpp /props n_ctx") if _positive(n_ctx) else None


async def _from_lmstudio(
    pool: UpstreamPool, upstream: Upstream, model: str | None, timeout: float
) -> tuple[int, str] | None:
    url = f"{upstream.root_url}/api/v0/models"
    listing = await pool.fetch_json(upstream, "GET", url, timeout=timeout)
    for entry in listing.get("data", ()) if isinstance(listing, dict) else ():
        if not isinstance(entry, dict) or (model is not None and entry.get("id") != model):
            continue
        for key in ("loaded_context_length", "max_context_length"):
            if _positive(entry.get(key)):
                return int(entry[key]), f"LM Studio /api/v0/models {key}"
    return None


async def _from_ollama(
    pool: UpstreamPool, upstream: Upstream, model: str | None, timeout: float
) -> tuple[int, str] | None:
    if not model:
        return None
    root = upstream.root_url
    show = await pool.fetch_json(
        upstream, "POST", f"{root}/api/show", body={"model": model}, timeout=timeout
    )
    if not isinstance(show, dict):
        return None
    trained = _ollama_trained_context(show)
    try:
        running = await pool.fetch_json(upstream, "GET", f"{root}/api/ps", timeout=timeout)
    except ProxyError:
        running = None
    for entry in running.get("models", ()) if isinstance(running, dict) else ():
        named = isinstance(entry, dict) and entry.get("name") in (model, f"{model}:latest")
        if named and _positive(entry.get("context_length")):
            return int(entry["context_length"]), "Ollama /api/ps context_length"
    match = re.search(r"^\s*num_ctx\s+(\d+)", str(show.get("parameters") or ""), re.MULTILINE)
    if match:
        return int(match.group(1)), "Ollama Modelfile num_ctx"
    window = min(OLLAMA_DEFAULT_CONTEXT, trained) if trained else OLLAMA_DEFAULT_CONTEXT
    return window, "Ollama default context (set num_ctx in a Modelfile to use more)"


def _ollama_trained_context(show: dict) -> int | None:
    info = show.get("model_info")
    if not isinstance(info, dict):
        return None
    arch = info.get("general.architecture")
    value = info.get(f"{arch}.context_length") if arch else None
    return int(value) if _positive(value) else None


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def describe_servers(found: Sequence[FoundServer]) -> list[str]:
    """One human line per found server, for `start` and `doctor`."""
    lines = []
    for server in found:
        models = ", ".join(server.models[:5]) + (" ..." if len(server.models) > 5 else "")
        lines.append(f"{server.kind} at {server.base_url} ({models or 'no models listed'})")
    return lines
