"""Fitting a chat history into the model's context window.

The window holds the prompt and the reply. `compute_budget` reserves room for the reply
and a safety margin (our token counts are estimates for non-OpenAI models);
`trim_history` then drops the oldest conversation turns until the prompt fits in what
is left, never touching system messages or the user's last message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from proxy.inject.tokens import TokenCounter
from proxy.messages import is_conversation


@dataclass(frozen=True)
class Budget:
    """How a context window is shared: the reply, a safety margin, and the prompt."""

    window: int
    reply: int
    margin: int

    @property
    def available(self) -> int:
        """Tokens the prompt (history plus injected memory) may use."""
        return self.window - self.reply - self.margin


def compute_budget(
    window: int,
    max_tokens: int | None,
    default_reply: int,
    margin: int,
    *,
    max_reply_share: float = 0.5,
) -> Budget:
    """The budget for one request.

    The reply reserve is the request's `max_tokens` when it gives a positive one, else
    `default_reply`. Clamping keeps `available` from going negative:

    - the reply reserve is at most `max_reply_share` of the window. Apps often send a
      `max_tokens` as large as the window itself (a ceiling, rarely reached); reserving
      all of it would leave no room for the prompt. Only the reserve is clamped: the
      request still goes upstream with the app's own `max_tokens`;
    - the margin is at most what the reply leaves of the window.

    So `0 <= available <= window` for any input.
    """
    window = max(0, window)
    wanted = max_tokens if max_tokens is not None and max_tokens > 0 else default_reply
    reply = min(max(0, wanted), int(window * max_reply_share))
    margin = min(max(0, margin), window - reply)
    return Budget(window=window, reply=reply, margin=margin)


@dataclass(frozen=True)
class Trim:
    """The outcome of `trim_history`.

    `messages` are the kept messages in their original order; `kept` and `dropped` are
    indices into the input. `tokens` is what the kept messages cost as a prompt (reply
    priming included); the room left for the memory block is `available - tokens`.
    `fits` is False when even the messages that are never dropped exceed `available`.
    `whole` is what all the input messages cost as a prompt.
    """

    messages: list[dict[str, Any]]
    dropped: tuple[int, ...]
    kept: tuple[int, ...]
    tokens: int
    fits: bool
    whole: int


def trim_history(
    messages: list[dict[str, Any]],
    counter: TokenCounter,
    available: int,
    *,
    reserve: int = 0,
    slack: int = 0,
) -> Trim:
    """Drop the oldest conversation messages until the prompt fits in `available`.

    Never dropped: system and developer messages (wherever they are) and the last user
    message with everything after it (tool calls of the current turn, a prefill). Of
    the rest, the oldest go first (a greeting before the first user message is simply
    the oldest turn), and once any go, the kept history starts at a user message. An
    assistant message that calls tools and the tool results that follow it are dropped
    as one unit, so a tool result never survives its call.
    `reserve` tokens are kept free for the memory block.

    `slack` keeps the prompt's head stable for a local server's prompt cache. Apps
    resend the whole chat each turn and this function keeps no state, so cutting to
    exactly the limit would move the start of the kept history every turn and
    invalidate the cached prefix. Instead the number of tokens dropped is rounded up
    to a multiple of `slack` counted from the start of the conversation: as the chat
    grows, the cut point stays put until the overflow crosses the next multiple,
    i.e. it moves about once every `slack` tokens of new conversation. The kept prompt
    then uses between `available - slack` (minus one unit) and `available` tokens.
    `slack` is limited to half the room the conversation has, so that a small window
    never loses most of its history to the rounding.

    Pure; counts each message once (and `counter` caches repeats).
    """
    n = len(messages)
    costs = [counter.count_message(m) for m in messages]
    total = whole = counter.per_reply + sum(costs)

    protected_from = _protected_tail_start(messages)
    units = _droppable_units(messages, protected_from)

    excess = total + max(0, reserve) - available
    drop: set[int] = set()
    if excess > 0 and units:
        fixed = total - sum(costs[i] for unit in units for i in unit)
        room = available - max(0, reserve) - fixed
        step = min(max(0, slack), max(0, room) // 2)
        target = math.ceil(excess / step) * step if step > 0 else excess
        dropped_tokens = 0
        for unit in units:
            # ...and on to a user message: a chat template that wants user and assistant
            # to alternate (Mistral's, Gemma's) refuses history that opens with a reply.
            if dropped_tokens >= target and messages[unit[0]].get("role") == "user":
                break
            drop.update(unit)
            dropped_tokens += sum(costs[i] for i in unit)
        total -= dropped_tokens

    kept = tuple(i for i in range(n) if i not in drop)
    return Trim(
        messages=[messages[i] for i in kept],
        dropped=tuple(sorted(drop)),
        kept=kept,
        tokens=total,
        fits=total <= available,
        whole=whole,
    )


def _protected_tail_start(messages: list[dict[str, Any]]) -> int:
    """Index of the last user message; without one, of the last conversation message."""
    last_conversation = len(messages)
    for i in range(len(messages) - 1, -1, -1):
        role = messages[i].get("role")
        if role == "user":
            return i
        if last_conversation == len(messages) and is_conversation(messages[i]):
            last_conversation = i
    return last_conversation


def _droppable_units(messages: list[dict[str, Any]], end: int) -> list[list[int]]:
    """Conversation messages before `end`, grouped into units that are dropped whole.

    A unit is one message, or an assistant message with tool/function calls together
    with the tool/function results that follow it (system messages in between do not
    break the unit; they are never dropped).
    """
    units: list[list[int]] = []
    open_call: list[int] | None = None
    for i in range(end):
        message = messages[i]
        if not is_conversation(message):
            continue
        role = message.get("role")
        if role in ("tool", "function") and open_call is not None:
            open_call.append(i)
            continue
        unit = [i]
        units.append(unit)
        calls_tools = role == "assistant" and (
            message.get("tool_calls") or message.get("function_call")
        )
        open_call = unit if calls_tools else None
    return units
