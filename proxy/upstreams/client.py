"""Sending requests to upstreams: one pooled aiohttp session per upstream, errors named.

The request path uses aiohttp rather than httpx because it was measured to: at 64
concurrent streams httpcore spent a third of the proxy's CPU in its connection pool,
and the proxy's CPU per streamed request went from ~4.5 ms to ~1.5 ms with aiohttp
(bench/README.md, issue #2). httpx stays where speed does not matter (the embeddings
upstream, the CLI, local-server probes, tests).

What the pool hands out is our own small `UpstreamResponse`, and every transport
failure, before or during the body, becomes one of ours:

    UpstreamUnreachable (502)  refused, DNS, reset, closed before or during the body
    UpstreamTimeout (504)      connect (or a free connection) took longer than
                               `connect_timeout`, or no byte came for `read_timeout`
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import aiohttp

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.upstreams.registry import Upstream

# Client headers worth passing on; everything else (cookies, the app's own headers,
# Open WebUI's user-identifying headers, X-Memory-*) stays here.
FORWARDED_HEADERS = frozenset(
    {"accept", "content-type", "openai-organization", "openai-project", "openai-beta"}
)

# Transport failures as aiohttp raises them (timeouts are ClientErrors and OSErrors).
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)


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


class UpstreamResponse:
    """An upstream's answer with its body not read yet.

    `headers` is case-insensitive. The body comes decoded (gzip, deflate, and whatever
    else the session offered in Accept-Encoding). Reading it raises UpstreamError
    (UpstreamTimeout, UpstreamUnreachable) on a transport failure. The owner must
    `aclose()` it, in `finally`: a body read to the end gives its connection back to
    the pool, anything else closes the connection (so the upstream sees it go).
    """

    __slots__ = ("_response", "_upstream", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse, upstream: Upstream):
        self._response = response
        self._upstream = upstream
        self.status_code: int = response.status
        self.headers: Mapping[str, str] = response.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one read at a time (never an empty chunk)."""
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except _TRANSPORT_ERRORS as exc:
            failure = exc
        else:
            return
        if rest := _arrived_before_failure(content):
            yield rest
        raise translate_error(self._upstream, failure) from failure

    async def aread(self) -> bytes:
        """The whole body."""
        try:
            return await self._response.read()
        except _TRANSPORT_ERRORS as exc:
            raise translate_error(self._upstream, exc) from exc

    async def aclose(self) -> None:
        """Give the connection back if the body was read to the end, else close it."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class UpstreamPool:
    """Owns one `aiohttp.ClientSession` per upstream (connection reuse across requests).

    Build it inside the running event loop (the app's lifespan) and `aclose()` it there.
    """

    def __init__(self, upstreams: Mapping[str, Upstream]):
        self._sessions = {name: _session(u) for name, u in upstreams.items()}
        # The client Authorization each `forward_client_key` upstream last accepted:
        # background work (summaries, facts) has no client of its own to take a key
        # from. In memory only; never written anywhere.
        self._lent: dict[str, str] = {}
        # Upstreams that refused the `stream_options` we add to ask for usage (older
        # servers answer 400/422 to a field they do not know): not sent to them again.
        self._no_stream_options: set[str] = set()

    def lend_key(self, upstream: Upstream, client_headers: Mapping[str, str]) -> None:
        """Keep the client's key that `upstream` just accepted, for `lent_headers`."""
        key = client_headers.get("authorization")
        if key and upstream.forward_client_key and not upstream.api_key:
            self._lent[upstream.name] = key

    def lent_headers(self, upstream: Upstream) -> dict[str, str]:
        """Client headers for a request of our own (background work) to `upstream`:
        the client key it last accepted, if it forwards client keys."""
        key = self._lent.get(upstream.name)
        return {"authorization": key} if key else {}

    def takes_stream_options(self, upstream: Upstream) -> bool:
        """Whether `upstream` may be sent a `stream_options` the client did not send."""
        return upstream.name not in self._no_stream_options

    def refuse_stream_options(self, upstream: Upstream) -> bool:
        """Send `upstream` no `stream_options` of ours again; True the first time."""
        if upstream.name in self._no_stream_options:
            return False
        self._no_stream_options.add(upstream.name)
        return True

    async def aclose(self) -> None:
        """Close every session and its connections."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def send(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        params: str | None = None,
    ) -> UpstreamResponse:
        """Send a request and return the response once its headers are in (body unread).

        The caller owns the response and must `aclose()` it, in `finally`.
        Transport failures become UpstreamUnreachable (502) or UpstreamTimeout (504).
        """
        url = upstream.url(path)
        if params:
            url = f"{url}?{params}"
        try:
            response = await self._sessions[upstream.name].request(
                method, url, headers=headers, data=content, allow_redirects=False
            )
        except _TRANSPORT_ERRORS as exc:
            raise translate_error(upstream, exc) from exc
        return UpstreamResponse(response, upstream)

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

        `timeout` limits connecting and each wait for data. `client_headers` are the
        app's request headers, when there is one: they carry the client's key for an
        upstream with `forward_client_key`.
        """
        headers = upstream_headers(upstream, client_headers or {})
        headers.pop("content-type", None)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        limits = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        try:
            async with self._sessions[upstream.name].request(
                method, url, data=data, headers=headers, timeout=limits, allow_redirects=False
            ) as response:
                status = response.status
                content = await response.read()
        except _TRANSPORT_ERRORS as exc:
            raise translate_error(upstream, exc, limit=timeout) from exc
        if status != 200:
            raise UpstreamError(f"upstream {upstream.name!r} answered {status} for {url}")
        try:
            return json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise UpstreamError(f"upstream {upstream.name!r} sent invalid JSON for {url}") from exc


def _arrived_before_failure(content: aiohttp.StreamReader) -> bytes:
    """The bytes that came in before the transport failed and were not read yet.

    aiohttp's reads raise as soon as the stream fails, even with bytes still buffered
    (an upstream that sends its last events and dies at once); a relay passes them on
    before the error, as httpx did. aiohttp has no public way to get them, hence the
    private attributes, read defensively (tests/test_faults.py checks the behaviour).
    """
    buffer = getattr(content, "_buffer", None)
    if not buffer:
        return b""
    data = b"".join(buffer)[getattr(content, "_buffer_offset", 0) :]
    buffer.clear()
    return data


def _session(upstream: Upstream) -> aiohttp.ClientSession:
    """The session for one upstream: its limits and timeouts, no cookies, no env proxies.

    `connect` covers waiting for a free connection and connecting; `sock_read` is the
    longest silence between two reads (waiting for the headers included), as httpx's
    read timeout was. Content-Type is never made up: a body without one goes without.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=upstream.max_connections, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=upstream.connect_timeout,
            sock_connect=upstream.connect_timeout,
            sock_read=upstream.read_timeout,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Content-Type",),
        trust_env=False,
    )


def translate_error(
    upstream: Upstream, exc: BaseException, *, limit: float | None = None
) -> UpstreamError:
    """Turn an aiohttp transport error into one of ours, naming the upstream.

    `limit` is the timeout that applied, when it was not the upstream's own.
    """
    where = f"upstream {upstream.name!r} ({upstream.base_url})"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        limit = limit if limit is not None else upstream.connect_timeout
        return UpstreamTimeout(f"{where} timed out connecting (limit {limit:g} s)")
    if isinstance(exc, TimeoutError):
        limit = limit if limit is not None else upstream.read_timeout
        return UpstreamTimeout(f"{where} timed out waiting for data (limit {limit:g} s)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or exc.os_error
        return UpstreamUnreachable(f"{where} is unreachable: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamUnreachable(f"{where} closed the connection: {exc}")
    if isinstance(exc, ConnectionError | aiohttp.ClientOSError):
        return UpstreamUnreachable(f"{where} closed the connection: {exc}")
    return UpstreamUnreachable(f"{where} failed: {type(exc).__name__}: {exc}")
