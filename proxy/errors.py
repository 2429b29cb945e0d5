"""Every error the proxy reports, and the one shape it reports them in.

The tree, written down once:

    ProxyError                 base: status 500, type "server_error"
    ├── BadRequest             400 invalid_request_error (a field named in `param`)
    │   └── InvalidScopeName   400 invalid_request_error, code "invalid_scope"
    ├── Unauthorized           401 authentication_error
    ├── NotFound               404 not_found_error
    │   └── ModelNotFound      404 invalid_request_error, code "model_not_found"
    ├── Conflict               409 conflict_error (the resource's state forbids the change)
    ├── PayloadTooLarge        413 invalid_request_error
    ├── ServiceUnavailable     503 service_unavailable (a feature that is switched off)
    └── UpstreamError          502 upstream_error (the upstream is named in the message)
        ├── UpstreamUnreachable 502 (refused, DNS, reset before a response)
        └── UpstreamTimeout     504

All of them render as OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.
An unexpected exception (a bug) answers a bare `ProxyError(INTERNAL_ERROR)`: nothing of
the exception reaches the client; its traceback goes to the log.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

# What a client is told of a bug: where to look, never the exception itself.
INTERNAL_ERROR = "internal error in mnemoproxy; see its log"


class ProxyError(Exception):
    """An error with an HTTP status and an OpenAI error type."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error envelope for this error."""
        return error_envelope(self.message, self.type, param=self.param, code=self.code)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class InvalidScopeName(BadRequest):
    default_code = "invalid_scope"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    default_code = "model_not_found"


class Conflict(ProxyError):
    status = 409
    type = "conflict_error"
    default_code = "conflict"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    default_code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


def error_envelope(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Build `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_error_event(error: ProxyError) -> bytes:
    """A mid-stream failure as one SSE event, followed by the stream terminator."""
    payload = json.dumps(error.envelope(), ensure_ascii=False)
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()
