"""The memory model: one JSON question to an upstream, asked politely.

Background jobs (summary, facts, reflection) ask the model through `MemoryModel.ask`,
which

- waits for a free slot of the upstream (`UpstreamGate.background`): a user's request
  always goes first, and one that arrives while the job's request runs cancels it
  (`Preempted` reaches the worker, which requeues the job without counting a failure);
- asks for structured output (`response_format` with a JSON schema: OpenAI, llama.cpp,
  LM Studio and Ollama's /v1 all take it), and drops it for an upstream that answers
  400 to it;
- reads the answer leniently (`llm_json`) and checks its shape; on a bad answer it asks
  once more, showing the model what was wrong, then gives up with `BadOutput`;
- turns every transport or HTTP failure into `LlmUnavailable` (the worker backs off).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.errors import ProxyError
from proxy.inject.templates import render
from proxy.memory.llm_json import Parsed, parse_json
from proxy.upstreams.client import UpstreamPool, upstream_headers
from proxy.upstreams.gate import Preempted, UpstreamGate
from proxy.upstreams.registry import Upstream
from proxy.upstreams.windows import ContextWindows

log = logging.getLogger("mnemoproxy.llm")

T = TypeVar("T")
STRUCTURED_MODES = ("json_schema", "json_object", "off")
_SHOWN_BACK = 1500  # characters of a bad answer shown to the model when asking again
PROMPT_MARGIN = 64  # tokens kept free in the window besides the answer
CHARS_PER_TOKEN = 3  # a cautious estimate: our counts are not the upstream's tokenizer


def approx_tokens(text: str) -> int:
    """Tokens of `text` on an unknown tokenizer, overestimated rather than under."""
    return len(text) // CHARS_PER_TOKEN + 1


class LlmUnavailable(Exception):
    """The memory model could not be asked (unreachable, timeout, HTTP error): retry later."""


class WontFit(Exception):
    """The prompt cannot fit the memory model's context window: retrying will not help."""


class BadOutput(Exception):
    """The memory model's answers were not usable, twice. `raw` is the last answer."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True)
class Target:
    """Which upstream and model do a job's LLM work (None: the upstream's default model)."""

    upstream: str
    model: str | None = None


@dataclass(frozen=True)
class Reply:
    """One answer of the model: its text, why it stopped, and the tokens it cost."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class MemoryModel:
    """Asks upstreams JSON questions for background jobs (see the module docstring)."""

    def __init__(
        self,
        pool: UpstreamPool,
        gate: UpstreamGate,
        upstreams: Mapping[str, Upstream],
        *,
        timeout: float = 120.0,
        temperature: float = 0.2,
        structured: str = "json_schema",
        retry_prompt: str = "Your answer could not be used ({{error}}). Answer with only JSON.",
        count: Callable[[str, float], None] | None = None,
        windows: ContextWindows | None = None,
    ) -> None:
        if structured not in STRUCTURED_MODES:
            raise ValueError(f"structured output is one of {STRUCTURED_MODES}, not {structured!r}")
        self.pool = pool
        self.gate = gate
        self.upstreams = upstreams
        self.timeout = timeout
        self.temperature = temperature
        self.structured = structured
        self.retry_prompt = retry_prompt
        self._count = count or (lambda name, value: None)
        self._plain: set[str] = set()  # upstreams that refused structured output
        self.windows = windows

    async def room(self, target: Target, max_tokens: int) -> int | None:
        """Prompt tokens the target's context window leaves beside an answer of
        `max_tokens` (None: unknown, no limit but the settings')."""
        upstream = self.upstreams.get(target.upstream)
        if self.windows is None or upstream is None:
            return None
        try:
            window = await self.windows.get(upstream, target.model)
        except Exception:  # discovery is best effort; the request itself will tell
            return None
        return window.tokens - max_tokens - PROMPT_MARGIN

    async def ask(
        self,
        target: Target,
        messages: list[dict[str, Any]],
        *,
        name: str,
        schema: dict[str, Any],
        max_tokens: int,
        check: Callable[[Parsed], T],
    ) -> T:
        """Ask, read the JSON answer and `check` it (which raises ValueError when the
        answer is unusable, else returns what the job needs). One retry on a bad answer.

        Raises Preempted, LlmUnavailable or BadOutput.
        """
        upstream = self.upstreams.get(target.upstream)
        if upstream is None:
            raise LlmUnavailable(f"no upstream named {target.upstream!r} is configured")
        conversation = list(messages)
        for attempt in (1, 2):
            reply = await self.complete(
                upstream, target.model, conversation, name, schema, max_tokens
            )
            try:
                return check(parse_json(reply.text))
            except ValueError as exc:
                error = str(exc)
                if reply.finish_reason == "length":
                    error += " (the answer was cut off at max_tokens: be shorter)"
                self._count("background_llm_bad_answers", 1)
                if attempt == 2:
                    snippet = " ".join(reply.text.split())[:200]
                    raise BadOutput(
                        f"{name}: the model's answer was not usable twice: {error}; "
                        f"last answer: {snippet!r}",
                        reply.text,
                    ) from exc
                log.info("%s: unusable answer (%s); asking once more", name, error)
                if reply.text.strip():
                    shown = reply.text[:_SHOWN_BACK]
                    conversation.append({"role": "assistant", "content": shown})
                conversation.append(
                    {"role": "user", "content": render(self.retry_prompt, {"error": error})}
                )
        raise AssertionError("unreachable")

    async def complete(
        self,
        upstream: Upstream,
        model: str | None,
        messages: list[dict[str, Any]],
        name: str,
        schema: dict[str, Any],
        max_tokens: int,
    ) -> Reply:
        """One chat completion in a free slot of the upstream (Preempted if a user takes it)."""
        mode = "off" if upstream.name in self._plain else self.structured
        body = _body(model, messages, max_tokens, self.temperature, name, schema, mode)
        status, data = await self._post(upstream, body)
        if status in (400, 422) and mode != "off":
            # Not every server takes response_format (or this schema): try plainly. If
            # that works, ask plainly from now on (the prompt asks for JSON anyway and
            # the reader is lenient); if not, the 400 was about something else.
            refused = (status, data)
            body.pop("response_format", None)
            status, data = await self._post(upstream, body)
            if status == 200:
                log.warning(
                    "upstream %r refused structured output (%s: %s); asking without it",
                    upstream.name,
                    refused[0],
                    _error_text(refused[1]),
                )
                self._plain.add(upstream.name)
            else:
                status, data = refused
        if status != 200:
            error = _error_text(data)
            raise LlmUnavailable(f"upstream {upstream.name!r} answered {status}: {error}")
        reply = _reply(data, upstream.name)
        self._count("background_llm_calls", 1)
        self._count("background_llm_prompt_tokens", reply.prompt_tokens)
        self._count("background_llm_completion_tokens", reply.completion_tokens)
        return reply

    async def _post(self, upstream: Upstream, body: dict[str, Any]) -> tuple[int, Any]:
        content = json.dumps(body, ensure_ascii=False).encode()
        headers = upstream_headers(
            upstream, {**self.pool.lent_headers(upstream), "content-type": "application/json"}
        )
        try:
            async with self.gate.background(upstream.name):
                try:
                    async with asyncio.timeout(self.timeout):
                        response = await self.pool.send(
                            upstream, "POST", "chat/completions", headers=headers, content=content
                        )
                        try:
                            raw = await response.aread()
                        finally:
                            await response.aclose()
                except TimeoutError as exc:
                    raise LlmUnavailable(
                        f"upstream {upstream.name!r} did not answer within {self.timeout:g} s"
                    ) from exc
                except ProxyError as exc:
                    raise LlmUnavailable(str(exc)) from exc
        except Preempted:
            self._count("background_llm_preempted", 1)
            raise
        try:
            return response.status_code, json.loads(raw)
        except ValueError:
            return response.status_code, raw.decode("utf-8", "replace")


def _body(
    model: str | None,
    messages: list[dict[str, Any]],
    max_tokens: int,
    temperature: float,
    name: str,
    schema: dict[str, Any],
    mode: str,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": False,
    }
    if model:
        body["model"] = model
    if mode == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": name, "strict": True, "schema": schema},
        }
    elif mode == "json_object":
        body["response_format"] = {"type": "json_object"}
    return body


def _reply(data: Any, upstream: str) -> Reply:
    """The text of a chat completion (content parts joined), or LlmUnavailable."""
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise LlmUnavailable(
            f"upstream {upstream!r} sent something that is not a chat completion: "
            f"{str(data)[:200]!r}"
        ) from exc
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Reply(
        text=str(content),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _error_text(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", ""))[:300]
    return " ".join(str(data).split())[:300]
