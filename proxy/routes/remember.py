"""The memory layer of a chat request: steps 3-7 before forwarding, step 9 after.

`Remember.prepare` resolves the scope, lines the request up with the stored transcript,
trims the history to the model's budget, recalls what fell out (summary, style sample,
pinned notes, retrieved memories) and places the memory block near the end of the
prompt. It is fail-open: any failure of the memory layer leaves the request as it came,
with `X-Memory-Error` saying why. The plan it returns records the turn once the reply
is known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import cachetools

from proxy.errors import BadRequest, InvalidScopeName
from proxy.inject.block import EMPTY_BLOCK, Block, BlockInput, Caps, Recalled, build_block
from proxy.inject.budget import Trim, compute_budget, trim_history
from proxy.inject.place import place_block
from proxy.inject.templates import Templates
from proxy.inject.tokens import TokenCounter, encoding_for_model
from proxy.memory import records
from proxy.memory.embed import CachedEmbedder, EmbeddingError
from proxy.memory.rank import Weights
from proxy.memory.recall import (
    Lookup,
    RecallQuery,
    ScopeContext,
    look_up,
    query_text,
    recall,
    scope_context,
)
from proxy.memory.record import Recorded, Turn, Write, record_turn, transcript_index
from proxy.memory.schedule import BackgroundConfig, TurnJobs, first_in_window
from proxy.memory.scope import (
    InvalidScope,
    ScopeRef,
    chat_members,
    detect_names,
    resolve_scope,
)
from proxy.memory.speakers import move_name_prefixes, named_reply
from proxy.memory.store import Store
from proxy.memory.summary import shown_while_undoing
from proxy.memory.transcript import Alignment, TranscriptIndex, align
from proxy.memory.worker import Activity, Worker
from proxy.messages import message_text
from proxy.metrics import Metrics
from proxy.routes.auth import Identity
from proxy.routes.plan import ChatPlan, UnchangedPlan
from proxy.routes.validation import parse_date
from proxy.settings import Settings
from proxy.style.sample import sample_to_show
from proxy.upstreams.registry import Route
from proxy.upstreams.sse import ReplyAccumulator
from proxy.upstreams.windows import ContextWindows

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("mnemoproxy.memory")

T = TypeVar("T")

# The longest a request waits for its query's embedding before it recalls by keyword
# only (the local model takes milliseconds; an upstream's /embeddings may hang).
QUERY_EMBED_TIMEOUT_S = 2.0
# Prompts of fewer tokens (by our count) do not calibrate the budget (`_calibrate`).
CALIBRATE_FROM_TOKENS = 1000
# `X-Memory-Write` values; anything else is refused (a mistyped "off" must not store).
WRITE_OFF = frozenset({"off", "false", "0", "no", "none", "disabled", "private", "never"})
WRITE_ON = frozenset({"", "on", "true", "1", "yes", "enabled"})


class Remember:
    """The memory layer as the chat route uses it (see `proxy.routes.plan.Memory`)."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        embedder: CachedEmbedder,
        windows: ContextWindows,
        templates: Templates,
        worker: Worker,
        activity: Activity,
        metrics: Metrics,
        background: BackgroundConfig | None = None,
    ):
        self.settings = settings
        self.background = background  # None: no background LLM jobs
        self.store = store
        self.embedder = embedder
        self.windows = windows
        self.templates = templates
        self.worker = worker
        self.activity = activity
        self.metrics = metrics
        caps = settings.caps
        self.caps = Caps(
            summary=caps.summary,
            memories=caps.memories,
            style=caps.style,
            notes=caps.notes,
            scene=caps.scene,
            total=caps.total,
        )
        r = settings.recall
        self.weights = Weights(
            similarity=r.similarity,
            keyword=r.keyword,
            recency=r.recency,
            importance=r.importance,
            recency_half_life_days=r.half_life_days,
            min_score=r.min_score,
        )
        self._counters: dict[str, TokenCounter] = {}
        self._scopes: cachetools.LRUCache[tuple[str, str], records.ScopeRow] = cachetools.LRUCache(
            4096
        )
        self._transcripts: cachetools.LRUCache[int, TranscriptIndex] = cachetools.LRUCache(256)
        self._scope_locks: dict[int, asyncio.Lock] = {}
        self.embedder_error: str | None = None  # set when the model failed to load
        # Upstream prompt_tokens / our estimate, per (upstream, model): our tiktoken
        # counts can be far from a local model's own tokenizer.
        self._token_ratio: dict[tuple[str, str | None], float] = {}

    # -- the plan ------------------------------------------------------------------

    async def prepare(
        self,
        *,
        identity: Identity,
        path_scope: str | None,
        headers: Mapping[str, str],
        body: dict[str, Any],
        route: Route,
    ) -> ChatPlan:
        """Steps 3-7 of a request. Raises only for bad input (invalid scope, bad date)."""
        try:
            ref = resolve_scope(path_scope=path_scope, headers=headers, body=body)
        except InvalidScope as exc:
            raise InvalidScopeName(str(exc), param="scope") from exc
        now = parse_now(headers.get("x-memory-now"))
        write_off = _write_off(headers.get("x-memory-write", ""))
        write = write_mode(write_off, body["messages"])
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        with self.activity:
            try:
                plan = await self._prepare(identity, ref, body, route, now, write, request_id)
            except Exception as exc:  # fail-open: the request goes through unchanged
                log.exception("memory step failed; forwarding the request unchanged")
                self.metrics.add("memory_errors")
                return UnchangedPlan(
                    headers={
                        "x-memory-scope": ref.name,
                        "x-memory-request-id": request_id,
                        "x-memory-error": _header_safe(f"{type(exc).__name__}: {exc}"),
                    }
                )
        plan.timings["prepare_ms"] = round((time.perf_counter() - started) * 1000, 3)
        plan.write_off = write_off
        return plan

    async def _prepare(
        self,
        identity: Identity,
        ref: ScopeRef,
        body: dict[str, Any],
        route: Route,
        now: float,
        write: Write,
        request_id: str,
    ) -> RememberPlan:
        messages: list[dict[str, Any]] = body["messages"]
        timings: dict[str, float] = {}  # each step's ms, for the request log
        lap = _Laps(timings)
        # A utility call (a title for a chat not seen yet) makes no scope: it stores nothing.
        scope = await self._scope(identity.owner, ref, now, create=write is not Write.NOTHING)
        lap("scope_ms")
        if scope is None:
            headers = {"x-memory-scope": ref.name, "x-memory-request-id": request_id}
            return RememberPlan(self, None, headers, None, request_id, now, write=Write.NOTHING)
        # The scope's own name: it may have been renamed since the app named it.
        headers = {"x-memory-scope": scope.name, "x-memory-request-id": request_id}
        if scope.settings.get("enabled") is False:
            return RememberPlan(self, None, headers, None, request_id, now, write=Write.NOTHING)
        names = detect_names(messages)
        scene = scope.settings.get("scene") or {}
        char = scene.get("char_name") or names.char
        user = scene.get("user_name") or names.user
        query = query_text(messages)
        # A group chat's "Name: text" messages, read with the names in `name`.
        named = move_name_prefixes(messages, user)
        spoken = named if named is not None else messages
        group = chat_members(messages) if named is not None else ()
        # The query embedding (its own thread) overlaps everything up to the vector
        # search: the transcript, trimming, and on the readers the scope's standing
        # context and the half of recall that needs no vector (`look_up`).
        embedding = self._embed_query_soon(query, timings)
        mem = self.settings.memory
        style_on = mem.style_sample and scope.settings.get("style") is not False
        context_task = _soon(self.store.read(scope_context, scope.id, style=style_on))
        lookup = self._look_up_soon(scope.id, query, now)

        transcript = await self._transcript(scope.id)
        alignment = align(spoken, transcript, max_blind_undo=self.settings.memory.max_blind_undo)
        lap("transcript_ms")

        window = await self.windows.get(route.upstream, route.model)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        margin = mem.margin_tokens + int(window.tokens * mem.margin_ratio)
        budget = compute_budget(window.tokens, max_tokens, mem.default_reply_tokens, margin)
        calibration = (route.upstream.name, route.model)
        available = int(budget.available / self._token_ratio.get(calibration, 1.0))
        counter = self._counter(route.model)
        slack = int(available * mem.trim_slack)
        # The block may take at most half of a small window: the latest turns matter
        # more than anything recalled (and would otherwise come back as memories).
        reserve = min(self.caps.total, available // 2) + counter.per_message
        trim = trim_history(messages, counter, available, reserve=reserve, slack=slack)
        if trim.dropped and trim.whole <= available:
            # The whole chat fits: it goes whole, and the block gets the room left (made
            # room would fill with recalled copies of what was cut, out of order).
            trim = trim_history(messages, counter, available, slack=slack)
        lap("budget_ms")

        errors: list[str] = []
        recalled: list[Recalled] = []
        try:
            recalled = await self._recall(
                scope.id, query, embedding, lookup, alignment, trim, now, errors, lap
            )
        finally:
            context = await context_task
        if alignment.undone and (
            context.summary is not None or any(m.kind == "summary" for m in recalled)
        ):
            # This request takes messages back: the summaries it shows must not tell
            # them (the turn's record rolls them back; this reply comes before that).
            shown, hidden = await self.store.read(shown_while_undoing, scope.id, alignment.undone)
            context = dataclasses.replace(context, summary=shown)
            recalled = [m for m in recalled if m.memory_id not in hidden]
        lap("recall_ms")

        block, trim = self._compose(
            messages,
            trim,
            alignment,
            context,
            recalled,
            char,
            user,
            group,
            scene,
            counter,
            available,
            slack,
        )
        sent = place_block(
            trim.messages,
            block.text,
            depth=mem.block_depth,
            merge_into_system=mem.merge_into_system,
        )
        lap("compose_ms")
        original_tokens = trim.whole
        sent_tokens = trim.tokens + (block.tokens + counter.per_message if block.text else 0)
        headers.update(
            {
                "x-memory-trimmed": str(len(trim.dropped)),
                "x-memory-injected": str(len(block.notes) + len(block.included)),
                "x-memory-prompt-tokens": str(sent_tokens),
                "x-memory-tokens-saved": str(max(0, original_tokens - sent_tokens)),
            }
        )
        if errors:
            headers["x-memory-error"] = _header_safe("; ".join(errors))
        changed = bool(trim.dropped) or bool(block.text) or route.model != body.get("model")
        out = {**body, "messages": sent, "model": route.model} if changed else None
        self.metrics.add("tokens_in", original_tokens)
        self.metrics.add("tokens_saved", max(0, original_tokens - sent_tokens))
        self.metrics.add("memories_injected", len(block.included))
        background = None
        if self.background is not None:
            background = TurnJobs(
                self.background,
                route.upstream.name,
                route.model,
                first_in_window(messages, trim.kept, trim.dropped),
            )
        log_entry = None
        if self.settings.request_log.enabled:  # built with the reply: after the first byte
            log_entry = functools.partial(
                self._log_entry,
                route,
                ref,
                alignment,
                window.tokens,
                window.source,
                available,
                trim,
                block,
                sent_tokens,
                sent,
                errors,
            )
        return RememberPlan(
            self,
            scope.id,
            headers,
            out,
            request_id,
            now,
            write=write,
            messages=spoken,
            char=char,
            user=user,
            reply_name=char if named is not None else None,
            log=log_entry,
            timings=timings,
            background=background,
            calibration=(calibration, sent_tokens),
        )

    def _embed_query_soon(
        self, query: str, timings: dict[str, float]
    ) -> asyncio.Future[np.ndarray] | None:
        """Start embedding the query, when recall will need it and the model is ready.

        If the request fails before recall awaits it, the task still ends on its own
        (its vector lands in the cache) and its outcome is retrieved, never leaked. Its
        time from here to the vector goes to `timings` as `embed_ms`.
        """
        if self.settings.recall.limit == 0 or not query.strip() or not self.embedder.ready:
            return None
        asked = time.perf_counter()
        future = _soon(self.embedder.embed_query(query))
        future.add_done_callback(
            lambda _: timings.update(embed_ms=round((time.perf_counter() - asked) * 1000, 3))
        )
        return future

    def _look_up_soon(self, scope_id: int, query: str, now: float) -> asyncio.Future[Lookup] | None:
        """Start the half of recall that needs no query vector, on a reader."""
        rec = self.settings.recall
        if rec.limit == 0 or not query.strip():
            return None
        w = self.weights
        return _soon(
            self.store.read(
                look_up,
                scope_id,
                query,
                rec.candidates,
                now=now if w.time > 0 else None,
                context=w.context > 0,
            )
        )

    async def _recall(
        self,
        scope_id: int,
        query: str,
        embedding: asyncio.Future[np.ndarray] | None,
        lookup: asyncio.Future[Lookup] | None,
        alignment: Alignment,
        trim: Trim,
        now: float,
        errors: list[str],
        lap: _Laps,
    ) -> list[Recalled]:
        """Ranked memories for the last user message, minus what the window still shows."""
        rec = self.settings.recall
        if lookup is None:
            return []
        vector = None
        if embedding is not None:
            # A failing or slow embedder (an upstream's /embeddings) costs the request its
            # vector search, not its reply: keyword search goes on. The embedding runs
            # on (shielded), so that its vector is cached for a retry.
            try:
                vector = await asyncio.wait_for(asyncio.shield(embedding), QUERY_EMBED_TIMEOUT_S)
            except TimeoutError:
                errors.append(f"query embedding took over {QUERY_EMBED_TIMEOUT_S:g} s")
            except EmbeddingError as exc:
                errors.append(str(exc))
            lap("embed_wait_ms")
        else:  # keyword search still works meanwhile
            errors.append(self.embedder_error or "warming up")
        exclude = frozenset(_kept_ids(alignment, trim) | set(alignment.undone))
        q = RecallQuery(query, vector, now, self.weights, rec.candidates, rec.limit, exclude)
        return await self.store.read(recall, scope_id, q, await lookup, timings=lap.into)

    def _compose(
        self,
        messages: list[dict[str, Any]],
        trim: Trim,
        alignment: Alignment,
        context: ScopeContext,
        recalled: list[Recalled],
        char: str | None,
        user: str | None,
        group: tuple[str, ...],
        scene: Mapping[str, str],
        counter: TokenCounter,
        available: int,
        slack: int,
    ) -> tuple[Block, Trim]:
        """Build the block, then give history back the room the block did not use."""
        kept_ids = _kept_ids(alignment, trim)
        # A sample taken from a message this request takes back (a swiped first reply) is
        # not shown; the turn's record drops it.
        hidden = kept_ids | set(alignment.undone)
        style = sample_to_show(context.style_text, context.style_message_id, hidden)
        if style is not None:  # the sample is its message already: not recalled twice
            recalled = [m for m in recalled if set(m.source_ids) != {context.style_message_id}]
        inp = BlockInput(
            summary=context.summary,
            memories=recalled,
            style_sample=style,
            style_speaker=context.style_speaker,
            notes=context.notes,
            scene={k: v for k, v in scene.items() if k in ("character", "location", "user")},
            char=char or "the character",
            user=user or "the user",
            group=group,
        )
        # The block gets at most the room the kept history leaves in the budget.
        room = max(0, available - trim.tokens - counter.per_message)
        caps = self.caps.within(room)
        block = build_block(inp, counter, self.templates, caps)
        # History gets back the room the block does not use. Memories it then shows
        # again leave the block, which frees more room: a few rounds settle it.
        for _ in range(4):
            if not trim.dropped:
                break
            reserve = block.tokens + counter.per_message if block.text else 0
            wider = trim_history(messages, counter, available, reserve=reserve, slack=slack)
            if len(wider.dropped) >= len(trim.dropped):
                break
            trim = wider
            shown = _kept_ids(alignment, trim) | hidden
            still = [
                m for m in inp.memories if not (m.source_ids and shown.issuperset(m.source_ids))
            ]
            shown_style = sample_to_show(inp.style_sample, context.style_message_id, shown)
            if len(still) == len(inp.memories) and shown_style == inp.style_sample:
                break
            inp = dataclasses.replace(inp, memories=still, style_sample=shown_style)
            block = build_block(inp, counter, self.templates, caps)
        return block if block.text else EMPTY_BLOCK, trim

    def _log_entry(
        self,
        route: Route,
        ref: ScopeRef,
        alignment: Alignment,
        window: int,
        window_source: str,
        available: int,
        trim: Trim,
        block: Block,
        sent_tokens: int,
        sent: list[dict[str, Any]],
        errors: list[str],
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "model": route.model,
            "upstream": route.upstream.name,
            "scope": ref.name,
            "scope_source": ref.source,
            "alignment": alignment.kind,
            "window": window,
            "window_source": window_source,
            "budget": available,
            "tokens": {
                "original": trim.whole,
                "sent": sent_tokens,
                "saved": max(0, trim.whole - sent_tokens),
                "block": block.tokens,
            },
            "trimmed": list(trim.dropped),
            "injected": [
                {
                    "memory_id": n.memory_id,
                    "kind": n.kind,
                    "section": "notes",
                    "pinned": True,
                    "text": n.text,
                }
                for n in block.notes
            ]
            + [
                {
                    "memory_id": m.memory_id,
                    "kind": m.kind,
                    "section": "memories",
                    "score": round(m.score, 4),
                    "components": {k: round(v, 4) for k, v in m.components.items()},
                    "source_ids": list(m.source_ids),
                    "text": m.text,
                }
                for m in block.included
            ],
            "sections": block.sections,
            "errors": errors,
        }
        if self.settings.request_log.store_messages:
            entry["messages"] = sent
        return entry

    # -- caches --------------------------------------------------------------------

    async def _scope(
        self, owner: str, ref: ScopeRef, now: float, *, create: bool = True
    ) -> records.ScopeRow | None:
        """The scope a chat request names (a name it had before a rename too); made if
        new, unless not `create` (then None)."""
        key = (owner, ref.name)
        row = self._scopes.get(key)
        if row is None and not create:
            return await self.store.read(records.find_scope, owner, ref.name)
        if row is None:
            row = await self.store.write(
                records.get_or_create_scope, owner, ref.name, ref.label, now, aliases=True
            )
            self._scopes[key] = row
        return row

    def forget_scope(self, owner: str | None = None, scope_id: int | None = None) -> None:
        """Drop cached scope rows and transcripts (after the memory API changed them)."""
        for key, row in list(self._scopes.items()):
            if (scope_id is None or row.id == scope_id) and (owner is None or key[0] == owner):
                del self._scopes[key]
        if scope_id is None:
            self._transcripts.clear()
        else:
            self._transcripts.pop(scope_id, None)

    async def _transcript(self, scope_id: int) -> TranscriptIndex:
        cached = self._transcripts.get(scope_id)
        if cached is None:
            cached = await self.store.read(transcript_index, scope_id)
            self._transcripts[scope_id] = cached
        return cached

    def _counter(self, model: str | None) -> TokenCounter:
        encoding = encoding_for_model(model or "")
        counter = self._counters.get(encoding)
        if counter is None:
            counter = self._counters[encoding] = TokenCounter(encoding)
        return counter

    # -- recording -------------------------------------------------------------------

    async def record(self, plan: RememberPlan, reply: ReplyAccumulator, partial: bool) -> None:
        """Step 9: store the turn (and the request log). Never raises."""
        self._calibrate(plan, reply, partial)
        if plan.scope_id is None or (plan.write is Write.NOTHING and plan.log is None):
            return
        message = reply.message() if (reply.content or reply.tool_calls) else None
        if message is not None and plan.reply_name:
            message = named_reply(message, plan.reply_name)
        log_entry = None
        if plan.log is not None:
            try:  # a request log entry that cannot be built must not cost the turn
                log_entry = {
                    **plan.log(),
                    "reply": message,
                    "partial": partial,
                    "usage": reply.usage,
                    "timings": plan.timings,
                }
            except Exception:
                log.exception("could not build the request log entry of %s", plan.request_id)
        turn = Turn(
            scope_id=plan.scope_id,
            messages=plan.messages,
            reply=message,
            partial=partial,
            char=plan.char,
            user=plan.user,
            now=plan.now,
            request_id=plan.request_id,
            max_blind_undo=self.settings.memory.max_blind_undo,
            capture_style=self.settings.memory.style_sample,
            log=log_entry,
            logged_at=plan.received_at,
            write=plan.write,
            write_off=plan.write_off,
            background=plan.background,
        )
        lock = self._scope_locks.setdefault(plan.scope_id, asyncio.Lock())
        try:
            async with lock:
                result: Recorded = await self.store.write(record_turn, turn)
                if result.transcript is not None:
                    self._transcripts[plan.scope_id] = result.transcript
        except Exception:
            log.exception("could not store the turn of request %s", plan.request_id)
            self.metrics.add("record_errors")
            self._transcripts.pop(plan.scope_id, None)
            return
        if result.memories or result.jobs:
            self.worker.wake()

    def _calibrate(self, plan: RememberPlan, reply: ReplyAccumulator, partial: bool) -> None:
        """Learn how the upstream counts tokens from the prompt_tokens it reports."""
        usage = reply.usage or {}
        actual = usage.get("prompt_tokens")
        if plan.calibration is None or partial or not isinstance(actual, int) or actual <= 0:
            return
        key, estimate = plan.calibration
        # A chat template adds a fixed few dozen tokens: on a short prompt they would
        # read as a large ratio (8 tokens counted, 48 reported: 6x) and shrink every
        # later budget of that model to a third.
        if estimate < CALIBRATE_FROM_TOKENS:
            return
        observed = actual / estimate
        old = self._token_ratio.get(key)
        ratio = observed if old is None else 0.7 * old + 0.3 * observed
        # Never below our own count (an upstream may cache or not count the template),
        # never absurdly above it (a broken usage report).
        self._token_ratio[key] = min(max(ratio, 1.0), 3.0)


@dataclass
class RememberPlan:
    """A prepared chat request (see `proxy.routes.plan.ChatPlan`)."""

    owner: Remember
    scope_id: int | None
    headers: dict[str, str]
    body: dict[str, Any] | None
    request_id: str
    now: float
    write: Write = Write.ALL
    write_off: bool = False  # the request said `X-Memory-Write: off` (see `Turn.write_off`)
    messages: list[dict[str, Any]] = field(default_factory=list)
    char: str | None = None
    user: str | None = None
    reply_name: str | None = None  # the reply's `name` where names are in the text
    log: Callable[[], dict[str, Any]] | None = None  # the request log's entry, when kept
    timings: dict[str, float] = field(default_factory=dict)
    background: TurnJobs | None = None
    calibration: tuple[tuple[str, str | None], int] | None = None  # key, our estimate
    received_at: float = field(default_factory=time.time)  # by the clock: the log's date

    @property
    def wants_usage(self) -> bool:
        """Whether the reply's usage would calibrate the budget (memory is on)."""
        return self.calibration is not None

    async def record(self, reply: ReplyAccumulator, *, partial: bool) -> None:
        """Store the turn once the reply is known. Never raises."""
        await self.owner.record(self, reply, partial)


def _soon(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    """Run `awaitable` as a task now. Its outcome is always retrieved, so a request that
    fails before awaiting it leaks no 'exception never retrieved' (the task just ends)."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _kept_ids(alignment: Alignment, trim: Trim) -> set[int]:
    kept = set(trim.kept)
    return {sid for index, sid in alignment.matched if index in kept}


def _write_off(value: str) -> bool:
    """Whether `X-Memory-Write` says off; BadRequest for a value it cannot mean."""
    word = value.strip().lower()
    if word in WRITE_OFF:
        return True
    if word in WRITE_ON:
        return False
    raise BadRequest(
        f"X-Memory-Write: {value.strip()[:40]!r} is neither off ({', '.join(sorted(WRITE_OFF))})"
        f" nor on ({', '.join(sorted(WRITE_ON - {''}))})",
        param="X-Memory-Write",
    )


def write_mode(write_off: bool, messages: list[dict[str, Any]]) -> Write:
    """What the request may store. An app's utility call is no part of the chat: nothing
    (whatever the headers say). `X-Memory-Write: off` is: its exchange is stored as
    private messages, without text, so that the next requests, which carry it again,
    know it (left out, they would store it as new messages)."""
    if _is_utility_call(messages):
        return Write.NOTHING
    if write_off:
        return Write.PRIVATE
    return Write.ALL


def _is_utility_call(messages: list[dict[str, Any]]) -> bool:
    """An app's own utility prompt (summarize, impersonate...): an instruction in a
    system message after the chat's last reply, with no new user message, or one of
    Open WebUI's tasks (`_is_app_task`). Read memory, write nothing.

    A request of system messages only is one too.

    A system message after the user's new message is part of an ordinary turn:
    SillyTavern's post-history instructions, an author's note at depth 0, a group
    chat's "[Write the next reply only as Bob.]". A reply that a skipped request got
    (one character answering another in a group) is stored from the next request.
    """
    if messages and _is_app_task(messages[-1]):
        return True
    if not messages or messages[-1].get("role") not in ("system", "developer"):
        return False
    for message in reversed(messages):
        if message.get("role") not in ("system", "developer"):
            return message.get("role") != "user"
    # Nothing but instructions (the first message of a chat without a greeting, say):
    # no turn to store; the app sends that reply back next time, and it is stored then
    # (stored now, each swipe of it was one more chat).
    return True


def _is_app_task(message: dict[str, Any]) -> bool:
    """Open WebUI's background tasks (a title, tags, follow-up questions, a search
    query for the chat): one user message that opens with "### Task:" and quotes the
    chat in <chat_history>; and its emoji (voice calls) and mixture-of-agents prompts,
    by their default wording. Sent with the chat's own headers, they would otherwise
    be stored as turns of the chat."""
    if message.get("role") != "user":
        return False
    text = message_text(message).lstrip()
    if text.startswith("### Task:") and "<chat_history>" in text:
        return True
    return text.startswith(_OPEN_WEBUI_TASKS)


# The openings of Open WebUI's default emoji and mixture-of-agents task prompts.
_OPEN_WEBUI_TASKS = (
    "Your task is to reflect the speaker's likely facial expression through a fitting emoji",
    "You have been provided with a set of responses from various models to the latest user",
)


def parse_now(value: str | None) -> float:
    """The request's "now": `X-Memory-Now` (ISO 8601 or unix seconds), else the clock."""
    if not value or not value.strip():
        return time.time()
    return parse_date(value, "X-Memory-Now")


def _header_safe(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:300]


class _Laps:
    """Records the milliseconds since the previous lap under each name."""

    def __init__(self, into: dict[str, float]):
        self.into = into
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round((now - self._last) * 1000, 3)
        self._last = now
