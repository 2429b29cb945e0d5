"""The memory block: what the proxy tells the model about the past, within token caps.

The block is one text made of sections, each under its own header and each capped:
scene, pinned notes, the rolling summary, retrieved memories (in time order, dated,
with speaker names) and a style sample. When the sections together exceed the total
cap, they get room in priority order: notes, scene, summary, memories, style.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from proxy.inject.templates import Templates, format_fields, render
from proxy.inject.tokens import TokenCounter

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# Where a sentence ends: terminal punctuation (and closing quotes/brackets) before
# whitespace, or a line break.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]*]*(?=\s)|\n")
_SECTION_SEP = "\n\n"
PRESENTATION_ORDER = ("scene", "notes", "summary", "memories", "style")
PRIORITY_ORDER = ("notes", "scene", "summary", "memories", "style")


@dataclass(frozen=True)
class Recalled:
    """One retrieved memory, ready to show the model (and to log)."""

    text: str
    speaker: str | None
    at: float  # unix time the memory is about (when it was said or learned)
    kind: str  # "turn", "fact", "summary", "insight", "note"
    score: float
    memory_id: int
    source_ids: tuple[int, ...] = ()
    role: str | None = None  # "user" / "assistant" when the memory is a turn
    components: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Note:
    """A pinned memory, shown as a note on every turn (and logged with its id)."""

    text: str
    memory_id: int | None = None  # None: a bare text, no memory behind it
    kind: str = "note"  # the memory's kind: any memory can be pinned


@dataclass(frozen=True)
class BlockInput:
    """Everything that may go into the memory block. `memories` are ranked best first."""

    summary: str | None = None
    memories: Sequence[Recalled] = ()
    style_sample: str | None = None
    style_speaker: str | None = None  # who said the sample, when known (a group's member)
    notes: Sequence[Note | str] = ()  # oldest first; a string is a Note without a memory
    scene: Mapping[str, str] = field(default_factory=dict)
    char: str = "Assistant"
    user: str = "User"
    # A group chat's characters: the block's header names them all, not only the one
    # who speaks next ({{char}}).
    group: Sequence[str] = ()


@dataclass(frozen=True)
class Caps:
    """Token caps: one per section (its header included) and one for the whole block."""

    summary: int = 400
    memories: int = 800
    style: int = 300
    notes: int = 200
    scene: int = 200
    total: int = 1600

    def within(self, total: int) -> Caps:
        """These caps for a block of at most `total` tokens: every section's shrunk in
        proportion, so that a small window still gets some of each (the style sample,
        last in priority, too), not the first sections' full caps and nothing else."""
        if total >= self.total:
            return self
        ratio = max(0, total) / self.total
        sections = {f.name: int(getattr(self, f.name) * ratio) for f in fields(self)}
        return Caps(**{**sections, "total": max(0, total)})


@dataclass(frozen=True)
class Block:
    """The built block. `tokens` counts `text` alone (no chat-message overhead).

    `included` are the memories shown, in the order shown (time order), `notes` the
    pinned notes shown; `sections` maps each non-empty section to its tokens.
    """

    text: str
    tokens: int
    included: tuple[Recalled, ...]
    sections: dict[str, int]
    notes: tuple[Note, ...] = ()


EMPTY_BLOCK = Block(text="", tokens=0, included=(), sections={})


def build_block(
    inp: BlockInput,
    counter: TokenCounter,
    templates: Templates,
    caps: Caps,
    *,
    tz: datetime.tzinfo | None = None,
) -> Block:
    """Build the memory block; `Block.text == ""` when there is nothing to say.

    Summary and style sample are cut at a sentence boundary (at a word, with "…",
    when not even one sentence fits). Memories: the best-ranked ones whose line fits
    are chosen (one too long for the room left is skipped, shorter ones after it may
    still fit), then shown oldest first with their date and speaker. Dates are written
    in `tz` (UTC when None, so output never depends on the machine). Deterministic.
    """
    builder = _Builder(inp, counter, templates, caps, tz or datetime.UTC)
    # Token counts of joined pieces are not exactly additive (BPE merges across a
    # join), so build against a limit and shrink it by any overflow until it fits.
    limit = caps.total
    while limit > 0:
        block = builder.build(limit)
        if block.tokens <= caps.total:
            return block
        limit -= block.tokens - caps.total
    return EMPTY_BLOCK


class _Builder:
    def __init__(
        self,
        inp: BlockInput,
        counter: TokenCounter,
        templates: Templates,
        caps: Caps,
        tz: datetime.tzinfo,
    ) -> None:
        self.inp = inp
        self.counter = counter
        self.t = templates
        self.caps = caps
        self.tz = tz
        self.names = {"char": inp.char, "user": inp.user}
        self.sep_tokens = counter.count_text(_SECTION_SEP)

    def build(self, limit: int) -> Block:
        names = self.names
        if len(self.inp.group) > 1:
            names = {**names, "char": ", ".join(self.inp.group)}
        header = render(self.t.block_header, names)
        remaining = limit - self.counter.count_text(header)
        sections: dict[str, _Section] = {}
        tokens: dict[str, int] = {}
        for name in PRIORITY_ORDER:
            cap = min(getattr(self.caps, name), remaining - self.sep_tokens)
            if cap <= 0:
                continue
            section, count = _fit(lambda n, name=name: self._section(name, n), cap, self.counter)
            if not section.pieces:
                continue
            sections[name], tokens[name] = section, count
            remaining -= count + self.sep_tokens
        if not sections:
            return EMPTY_BLOCK
        # Pieces of the whole text, each section's last one followed by the blank line
        # before the next: the block is counted piece by piece (`count_pieces`).
        parts = [(header,), *(sections[n].pieces for n in PRESENTATION_ORDER if n in sections)]
        pieces = [piece for part in parts[:-1] for piece in (*part[:-1], part[-1] + _SECTION_SEP)]
        pieces += parts[-1]
        memories = sections.get("memories")
        notes = sections.get("notes")
        return Block(
            text="".join(pieces),
            tokens=self.counter.count_pieces(pieces),
            included=memories.included if memories else (),
            sections=tokens,
            notes=notes.notes if notes else (),
        )

    def _section(self, name: str, limit: int) -> _Section:
        if name == "memories":
            return self._memories(limit)
        if name == "summary":
            return self._prose(self.t.summary_header, self.inp.summary, limit)
        if name == "style":
            # A sample cut mid-sentence would teach the voice of a broken sentence.
            sample = self.inp.style_sample
            header = self.t.style_header
            if self.inp.style_speaker:  # its own speaker's voice, whoever speaks now
                header = render(header, {**self.names, "char": self.inp.style_speaker})
            return self._prose(header, sample, limit, words=False)
        if name == "notes":
            notes = [n if isinstance(n, Note) else Note(n) for n in self.inp.notes]
            notes = [n for n in notes if _one_line(n.text)]
            lines = [format_fields(self.t.note_line, {"text": _one_line(n.text)}) for n in notes]
            return self._lines(self.t.notes_header, lines, limit, notes)
        return self._lines(self.t.scene_header, self._scene_lines(), limit)

    def _header(self, template: str) -> tuple[str, int]:
        """A section's header line (its line break included) and its tokens."""
        text = render(template, self.names) + "\n"
        return text, self.counter.count_text(text)

    def _prose(
        self, header_template: str, body: str | None, limit: int, *, words: bool = True
    ) -> _Section:
        if not body or not body.strip():
            return _NOTHING
        header, cost = self._header(header_template)
        cut = truncate(body.strip(), limit - cost, self.counter, cut_words=words)
        return _Section((header, cut)) if cut else _NOTHING

    def _lines(
        self, header_template: str, lines: list[str], limit: int, notes: Sequence[Note] = ()
    ) -> _Section:
        """The lines that fit; with `notes` (one per line), the notes shown too."""
        header, cost = self._header(header_template)
        room = limit - cost
        chosen, shown = [], []
        for index, line in enumerate(lines):
            line_cost = self.counter.count_text(line + "\n")
            if line and line_cost <= room:
                chosen.append(line)
                shown.extend(notes[index : index + 1])
                room -= line_cost
        return _Section(_joined(header, chosen), notes=tuple(shown)) if chosen else _NOTHING

    def _memories(self, limit: int) -> _Section:
        header, cost = self._header(self.t.memories_header)
        room = limit - cost
        chosen: list[tuple[Recalled, str]] = []
        for memory in self.inp.memories:  # best first
            line = self._memory_line(memory)
            line_cost = self.counter.count_text(line + "\n")
            if line_cost <= room:
                chosen.append((memory, line))
                room -= line_cost
        if not chosen:
            return _NOTHING
        chosen.sort(key=lambda pair: (pair[0].at, pair[0].memory_id))
        return _Section(
            _joined(header, [line for _, line in chosen]),
            tuple(memory for memory, _ in chosen),
        )

    def _memory_line(self, memory: Recalled) -> str:
        when = datetime.datetime.fromtimestamp(memory.at, self.tz)
        date = format_fields(
            self.t.memory_date,
            # isoformat: the same YYYY-MM-DD as strftime, at a fifth of its cost.
            {"date": when.date().isoformat(), "weekday": _WEEKDAYS[when.weekday()]},
        )
        speaker = memory.speaker or {"user": self.inp.user, "assistant": self.inp.char}.get(
            memory.role or ""
        )
        values = {"date": date, "text": _one_line(memory.text)}
        if speaker:
            return format_fields(self.t.memory_line, {**values, "speaker": speaker})
        return format_fields(self.t.memory_line_unattributed, values)

    def _scene_lines(self) -> list[str]:
        known = {
            "character": self.t.scene_character,
            "location": self.t.scene_location,
            "user": self.t.scene_user,
        }
        scene = self.inp.scene
        keys = [k for k in known if k in scene] + [k for k in scene if k not in known]
        lines = []
        for key in keys:
            value = _one_line(scene[key])
            if not value:
                continue
            template = known.get(key, self.t.scene_other)
            lines.append(render(template, {**self.names, "key": key, "value": value}))
        return lines


class _Section(NamedTuple):
    """A section of the block as the pieces of its text (see `count_pieces`)."""

    pieces: tuple[str, ...]
    included: tuple[Recalled, ...] = ()  # the memories it shows
    notes: tuple[Note, ...] = ()  # the notes it shows


_NOTHING = _Section(())


def _joined(header: str, lines: list[str]) -> tuple[str, ...]:
    """A header (with its line break) and lines, as pieces: each line but the last
    with its line break."""
    return (header, *(line + "\n" for line in lines[:-1]), lines[-1])


def _fit(build: Callable[[int], _Section], cap: int, counter: TokenCounter) -> tuple[_Section, int]:
    """Build a section against a shrinking limit until its real count is within `cap`;
    the section and its count."""
    limit = cap
    while limit > 0:
        section = build(limit)
        tokens = counter.count_pieces(section.pieces)
        if tokens <= cap:
            return section, tokens
        limit -= tokens - cap
    return _NOTHING, 0


def truncate(text: str, max_tokens: int, counter: TokenCounter, *, cut_words: bool = True) -> str:
    """The longest head of `text` within `max_tokens`, cut at a sentence boundary.

    When not even the first sentence fits, cut at a word and end with "…" (with
    `cut_words`); when nothing fits, the empty string.
    """
    if max_tokens <= 0:
        return ""
    if counter.count_text(text) <= max_tokens:
        return text
    sentence_cuts = sorted({m.end() for m in _SENTENCE_END.finditer(text)})
    head = _longest_head(text, sentence_cuts, max_tokens, counter, suffix="")
    if head or not cut_words:
        return head
    word_cuts = [m.start() for m in re.finditer(r"\s+", text)]
    return _longest_head(text, word_cuts, max_tokens, counter, suffix="…")


def _longest_head(
    text: str, cuts: list[int], max_tokens: int, counter: TokenCounter, suffix: str
) -> str:
    """Binary search over cut points for the longest head that fits.

    Token counts grow with the head's length for all practical purposes; `_fit`
    guards the rare exception.
    """
    first_visible = len(text) - len(text.lstrip())
    cuts = [cut for cut in cuts if cut > first_visible]  # heads that are not blank

    def head(i: int) -> str:
        return text[: cuts[i]].rstrip() + suffix

    lo, hi = 0, len(cuts)  # how many heads fit, known to lie in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if counter.count_text(head(mid - 1)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return head(lo - 1) if lo else ""


def _one_line(text: str) -> str:
    """Collapse whitespace, newlines included: one memory, one line."""
    return " ".join(text.split())
