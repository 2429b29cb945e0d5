"""How a request lines up with the stored transcript of its scope: what is new, what
was undone (design §4).

Pure functions: the store hands over the scope's active transcript as
`StoredMessage`s (oldest first, "partial" replies included), `align` says which
request messages are already stored, which stored ones to retract, and which
request messages to append. Nothing here reads or writes the store.

The transcript is a line. After the caller applies an alignment, the active
transcript ends with the request's conversation, in order (save the greeting,
which is stored once, and the rare messages reported in `skipped`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.messages import is_conversation, message_text, without_reasoning

__all__ = [
    "Alignment",
    "StoredMessage",
    "align",
    "conversation_indices",
    "message_fingerprint",
]

KINDS = ("empty", "continuation", "head_trimmed", "regenerate", "diverged", "new_chat")


@dataclass(frozen=True)
class StoredMessage:
    """One message of a scope's active transcript, as the store knows it.

    `thread` is the chat the message belongs to: one scope may hold several chats
    with the same character (the user starts a new chat, later goes back to an old
    one), and undo never reaches across chats.
    """

    id: int
    role: str
    fingerprint: str
    thread: int = 0
    private: bool = False  # of an `X-Memory-Write: off` exchange (stored without text)


@dataclass(frozen=True)
class Alignment:
    """What a request means for the stored transcript.

    matched: (request index, stored id) for request messages already stored, in
        request order; they are the stored messages inside the app's window.
    undone: stored ids to retract (oldest first): the stored tail after the last
        message the request has in common with it.
    new: request indices to append, in order (the reply is appended later by the
        caller).
    reuses: (request index, undone stored id) for each new message identical to
        an undone one, so that the store can keep its date and embedding.
    skipped: request indices of conversation messages that are neither matched nor
        new: a greeting that differs from the stored one, or the unknown head of a
        window the app already cut. They cannot be put in the line without undoing
        what follows them, so they are left out rather than guessed.
    kind: "empty" (nothing stored yet), "continuation", "head_trimmed" (as
        continuation, but the request starts after the start of the stored
        transcript and does not open with a greeting stored apart: a new chat in
        a scope without greetings looks the same; the kind only describes, both
        mean append and undo nothing), "regenerate" (stored messages undone,
        nothing new: swipe, retry, delete-below), "diverged" (stored messages
        undone and new ones appended: an edit, or delete-below then send), or
        "new_chat" (no trustworthy overlap: nothing undone, all appended; also a
        request with nothing but system messages and a greeting).
    """

    kind: str
    matched: tuple[tuple[int, int], ...] = ()
    undone: tuple[int, ...] = ()
    new: tuple[int, ...] = ()
    reuses: tuple[tuple[int, int], ...] = ()
    skipped: tuple[int, ...] = ()
    thread: int | None = None  # the chat the new messages continue; None: a new chat


def message_fingerprint(message: dict[str, Any]) -> str:
    """A short stable hash of what makes a message the same message.

    Covers the role, the `name`, the text (string content or text parts joined; line
    endings as `\\n`, whitespace at both ends stripped), non-text parts (an image
    resent is the same image), `tool_calls` (id, function name, arguments with JSON
    re-serialised canonically) and `tool_call_id`. Unknown keys are ignored, so a
    client that adds or drops bookkeeping fields does not make a message new.
    """
    role = message.get("role")
    name = message.get("name")
    text = message_text(message)
    if role == "assistant":  # the app may keep the answer without its reasoning
        text = without_reasoning(text)
    digest = hashlib.sha256()
    # The common fields go in directly, length-prefixed; the rare ones canonically.
    for field in (
        role if isinstance(role, str) else "",
        name.strip() if isinstance(name, str) else "",
        _normalise(text),
    ):
        data = field.encode("utf-8", "surrogatepass")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    extras: dict[str, Any] = {}
    content = message.get("content")
    if isinstance(content, list):
        media = [p for p in content if not (isinstance(p, dict) and _is_text_part(p))]
        if media:
            extras["media"] = media
    if message.get("tool_calls"):
        extras["tool_calls"] = [_tool_call_key(c) for c in message["tool_calls"]]
    if message.get("function_call"):
        extras["function_call"] = _function_key(message["function_call"])
    if message.get("tool_call_id") is not None:
        extras["tool_call_id"] = str(message["tool_call_id"])
    if extras:
        _feed(digest, extras)
    return digest.hexdigest()[:16]


def conversation_indices(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of the messages that take part in the transcript (not system prompts)."""
    return [i for i, message in enumerate(messages) if is_conversation(message)]


def align(
    messages: list[dict[str, Any]],
    stored: Sequence[StoredMessage] | TranscriptIndex,
    *,
    max_blind_undo: int = 4,
) -> Alignment:
    """Line the request's conversation up with the stored transcript.

    The greeting (leading assistant messages before the first user message) is set
    apart: it is matched to the latest stored copy wherever that is, never stored
    twice, and never counts as overlap (every chat with a character starts with it).

    The rest, the body, is anchored by its first message: every stored copy of it
    is a candidate start, extended while request and store agree (a run). The run
    chosen is, in order of preference, one that reaches the end of the store
    (nothing to undo), then the longest, then the most recent: so a new chat's turns
    continue its own messages, not an older chat's that began the same way. Then:

    - stored messages after the run are undone (regenerate, swipe, retry, edit,
      delete-below); request messages after the run are new, and a new message
      identical to an undone one is reported in `reuses`;
    - safety: undoing more than `max_blind_undo` messages needs a run that proves
      it is the same chat: at least 2 messages, a user and an assistant one among
      them. A lone "hi" equal to an old chat's first message must not undo that
      chat: another candidate is tried, and failing all, it is a new chat;
    - if no run starts at the body's first message (an edit of the first message of
      a window the app already cut), a later run is accepted only if it is sure in
      the sense above; the messages before it are `skipped`. Unless the request
      opens with the chat's greeting and then as many messages as the store holds
      between it and the run (in a chat without a greeting: as many as it holds
      before the run): the chat's first messages were edited, so everything after
      the greeting is undone and the body is new (as for any edit);
    - with no acceptable run it is a new chat (or an empty store): nothing undone,
      everything not yet stored appended; unless the request's greeting opens a
      stored chat that nobody has spoken in yet (replies asked for with nothing
      typed): then the request goes on with that chat, undoing the replies after the
      greeting it does not show (a swipe). An identical request sent twice (retry,
      swipe) undoes the reply stored after it and stores nothing twice; a user
      message re-sent after a failed turn is matched, not stored again.
    """
    conv = conversation_indices(messages)
    fps = [message_fingerprint(messages[i]) for i in conv]
    roles = [messages[i].get("role") for i in conv]
    n_greet = _greeting_length(messages, conv)
    if not stored:
        return Alignment(kind="empty", new=tuple(conv))

    index = stored if isinstance(stored, TranscriptIndex) else TranscriptIndex(stored)
    stored, chains, positions = index.stored, index.chains, index.positions

    body = range(n_greet, len(conv))
    run = _choose_run(fps, roles, body, chains, positions, max_blind_undo)
    greeting = _match_greeting(
        fps[:n_greet], stored, positions, before=run.start if run else len(stored)
    )
    greet_matched = [(conv[j], stored[p].id) for j, p in enumerate(greeting) if p is not None]
    greet_unmatched = [conv[j] for j, p in enumerate(greeting) if p is None]

    if run is None:
        new = tuple(greet_unmatched + [conv[j] for j in body])
        found = _greeting_chat(greeting, stored, chains, max_blind_undo)
        if found is None:
            return Alignment(kind="new_chat", matched=tuple(greet_matched), new=new)
        thread, after = found
        undone = tuple(stored[p].id for p in after)
        return Alignment(
            kind=("diverged" if new else "regenerate") if undone else "continuation",
            matched=tuple(greet_matched),
            undone=undone,
            new=new,
            reuses=_reuses(new, conv, fps, [stored[p] for p in after]),
            thread=thread,
        )

    edited = run.first - n_greet
    if edited > 0 and (
        _edits_after_greeting(greeting, run, chains, edited)
        or (not greeting and _edits_at_start(run, chains, edited))
    ):
        # The chat's greeting (if it has one), then as many messages as the store holds
        # there, then the run: those first messages were edited (an app that cut its
        # window would have cut them, not replaced them). As for an edit further down,
        # everything after the greeting is undone and the request's messages are new.
        if greeting:
            anchor = greeting[-1]
            assert anchor is not None  # the whole greeting is matched
            after = chains.after(anchor)
        else:
            start = chains.first(run.thread)
            after = [start, *chains.after(start)]
        new = tuple(conv[j] for j in body)
        return Alignment(
            kind="diverged",
            matched=tuple(greet_matched),
            undone=tuple(stored[p].id for p in after),
            new=new,
            reuses=_reuses(new, conv, fps, [stored[p] for p in after]),
            thread=run.thread,
        )
    matched = greet_matched + [
        (conv[run.first + t], stored[p].id) for t, p in enumerate(run.positions)
    ]
    after = chains.after(run.end)
    undone = tuple(stored[p].id for p in after)
    new = tuple(conv[j] for j in range(run.first + run.length, len(conv)))
    skipped = tuple(greet_unmatched + [conv[j] for j in range(n_greet, run.first)])
    if undone:
        kind = "diverged" if new else "regenerate"
    elif _window_start(greeting, run, chains) == chains.first(run.thread) or _starts_a_chat(
        greeting, run, chains
    ):
        kind = "continuation"
    else:
        kind = "head_trimmed"
    return Alignment(
        kind=kind,
        matched=tuple(matched),
        undone=undone,
        new=new,
        reuses=_reuses(new, conv, fps, [stored[p] for p in after]),
        skipped=skipped,
        thread=run.thread,
    )


# -- the run -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    first: int  # index into the conversation (conv) of the run's first message
    positions: tuple[int, ...]  # stored positions of the run, one chat, in order
    thread: int

    @property
    def start(self) -> int:
        return self.positions[0]

    @property
    def end(self) -> int:
        return self.positions[-1]

    @property
    def length(self) -> int:
        return len(self.positions)


class TranscriptIndex:
    """A stored transcript with what `align` looks up in it, built once.

    Building it walks the whole transcript; `align` on it then costs about the
    request's length, not the transcript's (a long chat's scope holds 100k messages:
    walking them took ~50 ms per request). Immutable: build a new one for a changed
    transcript.
    """

    def __init__(self, stored: Sequence[StoredMessage]):
        self.stored = tuple(stored)
        self.chains = _Chains(self.stored)
        positions: dict[str, list[int]] = defaultdict(list)
        private: list[int] = []
        for pos, message in enumerate(self.stored):
            positions[message.fingerprint].append(pos)
            if message.private:
                private.append(message.id)
        self.positions: Mapping[str, list[int]] = dict(positions)  # read with .get only
        self.private = frozenset(private)  # ids of the private messages

    def __len__(self) -> int:
        return len(self.stored)


class _Chains:
    """The stored transcript as chats: each position's neighbours within its thread."""

    def __init__(self, stored: Sequence[StoredMessage]):
        self.stored = stored
        self.next: list[int | None] = [None] * len(stored)
        self.prev: list[int | None] = [None] * len(stored)
        self.count_after = [0] * len(stored)
        self._first: dict[int, int] = {}
        last: dict[int, int] = {}
        for pos, message in enumerate(stored):
            previous = last.get(message.thread)
            if previous is not None:
                self.next[previous] = pos
                self.prev[pos] = previous
            else:
                self._first[message.thread] = pos
            last[message.thread] = pos
        seen: dict[int, int] = defaultdict(int)
        for pos in range(len(stored) - 1, -1, -1):
            thread = stored[pos].thread
            self.count_after[pos] = seen[thread]
            seen[thread] += 1

    def first(self, thread: int) -> int:
        """Position of the thread's first stored message."""
        return self._first[thread]

    def after(self, pos: int) -> list[int]:
        """Positions after `pos` in its thread, in order."""
        found = []
        nxt = self.next[pos]
        while nxt is not None:
            found.append(nxt)
            nxt = self.next[nxt]
        return found

    def before(self, pos: int, count: int) -> list[int]:
        """Up to `count` positions before `pos` in its thread, in order."""
        found: list[int] = []
        prv = self.prev[pos]
        while prv is not None and len(found) < count:
            found.append(prv)
            prv = self.prev[prv]
        return found[::-1]


def _choose_run(
    fps: list[str],
    roles: list[Any],
    body: range,
    chains: _Chains,
    positions: Mapping[str, list[int]],
    max_blind_undo: int,
) -> _Run | None:
    """The anchoring run of the body, or None: see `align` for the rules."""
    for first in body:
        best: tuple[tuple[bool, int, int], _Run] | None = None
        longest = len(fps) - first
        # Latest first: once a run covers the whole rest of the request, no earlier
        # start can be longer or reach further, so the search stops there.
        for start in reversed(positions.get(fps[first], ())):
            if best is not None and best[1].length == longest:
                break
            run = _extend(fps, first, start, chains)
            sure = _is_sure(roles, run)
            undo = chains.count_after[run.end]
            # The head of the body may anchor on any safe run; a later message
            # only on a sure one, since everything before it will be skipped.
            if first > body.start and not sure:
                continue
            if undo > max_blind_undo and not sure:
                continue
            rank = (undo == 0, run.length, start)
            if best is None or rank > best[0]:
                best = (rank, run)
        if best is not None:
            return best[1]
    return None


def _extend(fps: list[str], first: int, start: int, chains: _Chains) -> _Run:
    """The run from `start`, following the start's own chat (other chats interleave)."""
    found = [start]
    pos = chains.next[start]
    j = first + 1
    while pos is not None and j < len(fps) and chains.stored[pos].fingerprint == fps[j]:
        found.append(pos)
        pos = chains.next[pos]
        j += 1
    return _Run(first, tuple(found), chains.stored[start].thread)


def _is_sure(roles: list[Any], run: _Run) -> bool:
    """Whether a run proves the request and the store are the same chat."""
    if run.length < 2:
        return False
    seen = set(roles[run.first : run.first + run.length])
    return "user" in seen and "assistant" in seen


# -- greeting and reuse ------------------------------------------------------------


def _contiguous(greeting: list[int | None], run: _Run, chains: _Chains) -> bool:
    # Leading assistant messages stored right before the run in its chat: the first
    # messages of the window (an app cuts by tokens, not by turns), or the greeting.
    return bool(greeting) and greeting == chains.before(run.start, len(greeting))


def _edits_after_greeting(
    greeting: list[int | None], run: _Run, chains: _Chains, edited: int
) -> bool:
    """Whether the whole greeting is stored right before `edited` messages that come
    right before the run, in the run's chat."""
    if not greeting or None in greeting:
        return False
    before = chains.before(run.start, len(greeting) + edited)
    return len(before) == len(greeting) + edited and before[: len(greeting)] == greeting


def _edits_at_start(run: _Run, chains: _Chains, edited: int) -> bool:
    """Whether exactly `edited` messages come before the run in its chat (a chat
    without a greeting whose first messages the request changed)."""
    return len(chains.before(run.start, edited + 1)) == edited


def _window_start(greeting: list[int | None], run: _Run, chains: _Chains) -> int:
    """Stored position of the first message of the request's unbroken overlap."""
    if _contiguous(greeting, run, chains):
        return chains.before(run.start, len(greeting))[0]
    return run.start


def _starts_a_chat(greeting: list[int | None], run: _Run, chains: _Chains) -> bool:
    """Whether the request opens with its chat's greeting, stored apart from the run."""
    return bool(greeting) and None not in greeting and not _contiguous(greeting, run, chains)


def _greeting_chat(
    greeting: list[int | None],
    stored: Sequence[StoredMessage],
    chains: _Chains,
    max_blind_undo: int,
) -> tuple[int, list[int]] | None:
    """The chat that this request's greeting opens and that nobody has spoken in yet,
    if any: (its thread, its stored positions after the greeting, to undo).

    Its messages after the greeting are the character's alone: replies asked for with
    nothing typed. A request that shows them goes on with that chat; one that shows
    fewer swiped them (at most `max_blind_undo`, on the greeting's word alone). A chat
    with a user message in it is another chat: the request is a new one."""
    if not greeting or None in greeting:
        return None
    first = greeting[0]
    assert first is not None
    thread = stored[first].thread
    chain = [first, *chains.after(first)]
    if chains.first(thread) != first or chain[: len(greeting)] != greeting:
        return None
    after = chain[len(greeting) :]
    if any(stored[p].role != "assistant" for p in after) or len(after) > max_blind_undo:
        return None
    return thread, after


def _greeting_length(messages: list[dict[str, Any]], conv: list[int]) -> int:
    """How many conversation messages at the start are a greeting (assistant, no tools)."""
    count = 0
    for i in conv:
        message = messages[i]
        if message.get("role") != "assistant" or message.get("tool_calls"):
            break
        count += 1
    return count


def _match_greeting(
    fps: list[str],
    stored: Sequence[StoredMessage],
    positions: Mapping[str, list[int]],
    *,
    before: int,
) -> list[int | None]:
    """For each greeting message, the latest stored copy before `before`, or None."""
    used: set[int] = set()
    found: list[int | None] = []
    for fp in fps:
        hit = next(
            (p for p in reversed(positions.get(fp, ())) if p < before and p not in used),
            None,
        )
        if hit is not None:
            used.add(hit)
        found.append(hit)
    return found


def _reuses(
    new: tuple[int, ...],
    conv: list[int],
    fps: list[str],
    undone: Sequence[StoredMessage],
) -> tuple[tuple[int, int], ...]:
    """Pair new messages with identical undone ones, in order, each used once."""
    if not undone:
        return ()
    pool: dict[str, deque[int]] = defaultdict(deque)
    for message in undone:
        pool[message.fingerprint].append(message.id)
    fp_of = dict(zip(conv, fps, strict=True))
    pairs = []
    for index in new:
        ids = pool.get(fp_of[index])
        if ids:
            pairs.append((index, ids.popleft()))
    return tuple(pairs)


# -- fingerprint helpers -----------------------------------------------------------


def _feed(digest: Any, value: Any) -> None:
    """Feed a JSON-like value to a hash, canonically: typed, length-prefixed, keys sorted.

    Not json.dumps: escaping a long text or an inline image costs far more than
    hashing it, and this runs for every message of every request.
    """
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        digest.update(b"s%d:" % len(data))
        digest.update(data)
    elif isinstance(value, dict):
        digest.update(b"d%d:" % len(value))
        for k in sorted(value, key=str):
            _feed(digest, str(k))
            _feed(digest, value[k])
    elif isinstance(value, list | tuple):
        digest.update(b"l%d:" % len(value))
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, bool):
        digest.update(b"n" if value is None else b"T" if value else b"F")
    else:
        digest.update(b"v%s;" % repr(value).encode())


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _is_text_part(part: dict[str, Any]) -> bool:
    return part.get("type") in ("text", "input_text")


def _tool_call_key(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    return {
        "id": call.get("id"),
        "type": call.get("type") or "function",
        "function": _function_key(call.get("function")),
    }


def _function_key(function: Any) -> Any:
    if not isinstance(function, dict):
        return function
    return {"name": function.get("name"), "arguments": _canonical_json(function.get("arguments"))}


def _canonical_json(arguments: Any) -> Any:
    # Arguments are a JSON string; clients re-serialise it with other spacing.
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments.strip()
    return json.dumps(arguments, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
