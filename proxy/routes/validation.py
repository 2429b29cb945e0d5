"""Checks on a chat-completions body: enough to give a clear 400 naming the field.

Only what the proxy relies on is checked; every other field passes through untouched
for the upstream to judge.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from proxy.errors import BadRequest
from proxy.memory.records import MAX_DATE

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def validate_chat_body(body: dict[str, Any]) -> None:
    """Raise BadRequest (with `param`) if the body cannot be a chat request."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise BadRequest("'stream' must be a boolean", param="stream")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadRequest(f"'{field}' must be an integer", param=field)
        if isinstance(value, int) and value < (1 if field == "n" else 0):
            raise BadRequest(f"'{field}' must be positive", param=field)
    if "messages" not in body:
        raise BadRequest("'messages' is required", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array of message objects", param="messages")
    if not messages:
        raise BadRequest("'messages' must not be empty", param="messages")
    for i, message in enumerate(messages):
        _check_message(i, message)


def _check_message(i: int, message: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise BadRequest(f"'{where}' must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str):
        raise BadRequest(f"'{where}.role' is required and must be a string", param=f"{where}.role")
    if role not in ROLES:
        allowed = ", ".join(sorted(ROLES))
        raise BadRequest(
            f"'{where}.role' is {role!r}; expected one of {allowed}", param=f"{where}.role"
        )
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(
                    f"'{where}.content[{j}]' must be an object with a 'type'",
                    param=f"{where}.content[{j}]",
                )
    elif content is None:
        if role != "assistant" and role != "function":
            raise BadRequest(f"'{where}.content' is required", param=f"{where}.content")
    elif not isinstance(content, str):
        raise BadRequest(
            f"'{where}.content' must be a string or an array of content parts",
            param=f"{where}.content",
        )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"'{where}.name' must be a string", param=f"{where}.name")


def parse_date(value: str, param: str) -> float:
    """Unix seconds or an ISO 8601 date (a naive one in the machine's local time),
    between 1970 and the end of 9999; anything else is a BadRequest naming `param`."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.astimezone()
            seconds = parsed.timestamp()
        except (ValueError, OverflowError, OSError) as exc:
            raise BadRequest(
                f"{param} must be unix seconds or an ISO 8601 date, not {value!r}", param=param
            ) from exc
    if not 0 <= seconds <= MAX_DATE:  # NaN too
        raise BadRequest(f"{param} must be a date from 1970 to 9999, not {value!r}", param=param)
    return seconds
