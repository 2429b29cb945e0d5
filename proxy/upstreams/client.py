"""Sending requests to upstreams: one pooled HTTP client per upstream, errors named."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.upstreams.registry import Upstream

# Client headers worth passing on; everything else (cookies, the app's own headers,
# Open WebUI's user-identifying headers, X-Memory-*) stays here.
FORWARDED_HEADERS = frozenset(
    {"accept", "content-type", "openai-organization", "openai-project", "openai-beta"}
)


def upstream_headers(upstream: Upstream, client_headers: Mapping[str, str]) -> dict[str, str]:
    """Headers for the upstream request: a few of the client's, plus the right key.

    The upstream's own key wins; the client's `Authorization` is forwarded only when
    the upstream is configured with `forward_client_key`.
    """
    headers = {k: v for k, v in client_headers.items() if k in FORWARDED_HEADERS}
    if upstream.api_key:
        headers["authorization"] = f"Bearer {upstream.api_key}"
    elif upstream.forward_client_key and "authorization" in client_headers:
        headers["authorization"] = client_headers["authorization"]
    return headers


class UpstreamPool:
    """Owns one `httpx.AsyncClient` per upstream (connection reuse across requests)."""

    def __init__(self, upstreams: Mapping[str, Upstream]):
        self._clients = {
            name: httpx.AsyncClient(
                timeout=httpx.Timeout(
                    connect=u.connect_timeout,
                    read=u.read_timeout,
                    write=u.read_timeout,
                    pool=u.connect_timeout,
                ),
                limits=httpx.Limits(
                    max_connections=u.max_connections,
                    max_keepalive_connections=u.max_connections,
                ),
                follow_redirects=False,
                trust_env=False,
            )
            for name, u in upstreams.items()
        }

    async def aclose(self) -> None:
        """Close every client and its connections."""
        for client in self._clients.values():
            await client.aclose()

    async def send(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        params: str | None = None,
    ) -> httpx.Response:
        """Send a request and return the response with its body unread (streaming).

        The caller owns the response and must `aclose()` it, in `finally`.
        Transport failures become UpstreamUnreachable (502) or UpstreamTimeout (504).
        """
        client = self._clients[upstream.name]
        url = upstream.url(path)
        if params:
            url = f"{url}?{params}"
        request = client.build_request(method, url, headers=headers, content=content)
        try:
            return await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate_error(upstream, exc) from exc

    async def fetch_json(
        self,
        upstream: Upstream,
        method: str,
        url: str,
        *,
        timeout: float,
        body: object = None,
        client_headers: Mapping[str, str] | None = None,
    ) -> object:
        """A small JSON request to this upstream's server (model lists, discovery).

        `client_headers` are the app's request headers, when there is one: they carry
        the client's key for an upstream with `forward_client_key`.
        """
        client = self._clients[upstream.name]
        headers = upstream_headers(upstream, client_headers or {})
        headers.pop("content-type", None)
        try:
            response = await client.request(
                method, url, json=body, headers=headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise translate_error(upstream, exc) from exc
        if response.status_code != 200:
            raise UpstreamError(
                f"upstream {upstream.name!r} answered {response.status_code} for {url}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(f"upstream {upstream.name!r} sent invalid JSON for {url}") from exc


def translate_error(upstream: Upstream, exc: httpx.HTTPError) -> UpstreamError:
    """Turn an httpx transport error into one of ours, naming the upstream."""
    where = f"upstream {upstream.name!r} ({upstream.base_url})"
    if isinstance(exc, httpx.TimeoutException):
        phase = (
            "connecting"
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            else ("waiting for data")
        )
        limit = upstream.connect_timeout if phase == "connecting" else upstream.read_timeout
        return UpstreamTimeout(f"{where} timed out {phase} (limit {limit:g} s)")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnreachable(f"{where} is unreachable: {exc or 'connection refused'}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamUnreachable(f"{where} closed the connection: {exc}")
    return UpstreamUnreachable(f"{where} failed: {type(exc).__name__}: {exc}")
