"""Small ASGI helpers shared by the routes: headers, bodies, JSON and error responses."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from proxy.errors import BadRequest, PayloadTooLarge, ProxyError
from proxy.json_finite import loads_finite
from proxy.messages import without_lone_surrogates


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers as a dict with lower-case names (last one wins)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Read the whole request body, refusing more than `limit` bytes with a 413."""
    declared = request_headers(scope).get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the {limit}-byte limit"
            " ([server] max_body_bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body exceeds the {limit}-byte limit ([server] max_body_bytes)"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body, with a 400 that says what is wrong.

    A lone UTF-16 surrogate ("\\ud83d": JSON allows it, and a client that cut an emoji
    in half sends one) becomes U+FFFD: no UTF-8 text, so no stored message, can hold it.
    """
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        data = loads_finite(body)
        if b"\\ud" in body or b"\\uD" in body:  # an escaped surrogate, maybe a lone one
            data = without_lone_surrogates(data)
    # RecursionError: nested too deeply for the parser.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    return data


class ClientGone(Exception):
    """The client disconnected before we answered."""


def encode_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """ASGI header list from a mapping."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str | None = "application/json",
    headers: Mapping[str, str] | None = None,
) -> None:
    """Send a complete response (`content_type` None: without one)."""
    all_headers = {"content-type": content_type} if content_type else {}
    all_headers["content-length"] = str(len(body))
    all_headers.update(headers or {})
    await send(
        {"type": "http.response.start", "status": status, "headers": encode_headers(all_headers)}
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, data: Any, headers: Mapping[str, str] | None = None
) -> None:
    """Send a JSON response."""
    await send_bytes(send, status, json.dumps(data, ensure_ascii=False).encode(), headers=headers)


async def send_error(
    send: Send, error: ProxyError, headers: Mapping[str, str] | None = None
) -> None:
    """Send an error in OpenAI's envelope with its status."""
    await send_json(send, error.status, error.envelope(), headers)
