"""Reading JSON out of what a small model wrote, leniently.

Models asked for JSON wrap it in code fences, put prose around it, think aloud first
(`<think>...</think>`), write Python (`'single quotes'`, `True`, `None`), leave
trailing commas, forget to quote keys, use typographic quotes, or stop mid-way when
they reach `max_tokens`. `parse_json` reads all of that. It is a small tolerant
recursive-descent reader, not a chain of regex repairs, so that a quote inside a
string can never be "repaired" into a broken one.

A truncated answer is read as far as it goes: an unfinished element of an array is
dropped (half a fact is not a fact), an unfinished string elsewhere is kept, and the
result says it was truncated so that the caller can decide (a summary cut mid-way is
trimmed back to its last full sentence).

Two readers of values inside the JSON live here too: `read_importance` (0.7, "0.7",
7 of 10, 70 %, "high") and `normalise` (how two texts are told to be the same fact).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

_THINK = re.compile(r"<(think|thinking|reasoning)>.*?(</\1>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:json5?|javascript|js|python)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_QUOTES = {'"': '"', "'": "'", "“": "”", "”": "”", "‘": "’", "’": "’", "«": "»"}
_WORDS = {
    "true": True,
    "false": False,
    "null": None,
    "none": None,
    "nil": None,
    "undefined": None,
}
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation + "“”‘’«»„—–…", " "))


class JsonNotFound(ValueError):
    """Nothing in the text could be read as a JSON object or array."""


@dataclass(frozen=True)
class Parsed:
    """A value read from model output; `truncated`: the text ended before it did."""

    value: Any
    truncated: bool = False


def parse_json(text: str) -> Parsed:
    """The first JSON object or array in `text` (see the module docstring).

    Raises JsonNotFound when there is none.
    """
    text = _THINK.sub("", text.lstrip("\ufeff"))
    candidates = [m.group(1) for m in _FENCE.finditer(text) if m.group(1).strip()]
    candidates.append(text)
    for candidate in candidates:
        found = _first_value(candidate)
        if found is not None:
            return found
    snippet = " ".join(text.split())[:120]
    raise JsonNotFound(f"no JSON object in the model's answer: {snippet!r}")


def _first_value(text: str) -> Parsed | None:
    """Try every `{` / `[` in turn, best first: the first that reads as a container."""
    strict = _strict(text)
    if strict is not None:
        return strict
    fallback: Parsed | None = None  # an array, if no object reads
    for match in re.finditer(r"[\[{]", text):
        reader = _Reader(text, match.start())
        try:
            value = reader.value()
        except _Bad:
            continue
        if not value and reader.truncated:
            continue
        if isinstance(value, dict):
            return Parsed(value, reader.truncated)
        if fallback is None and isinstance(value, list):
            fallback = Parsed(value, reader.truncated)
    return fallback


def _strict(text: str) -> Parsed | None:
    """Plain JSON, as a model with structured output writes it."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    value = _unwrap(value)
    return Parsed(value) if isinstance(value, dict | list) else None


def _unwrap(value: Any) -> Any:
    """A JSON document inside a JSON string (double-encoded) is read once more."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class _Bad(Exception):
    """Not readable from this starting point."""


class _Eof(Exception):
    """The text ended inside a value."""

    def __init__(self, partial: Any = None, keep: bool = False) -> None:
        super().__init__("truncated")
        self.partial = partial
        self.keep = keep  # a string cut short: worth keeping outside arrays


class _Reader:
    """A tolerant JSON reader from position `start` of `text`."""

    def __init__(self, text: str, start: int) -> None:
        self.s = text
        self.i = start
        self.truncated = False

    def value(self) -> Any:
        """Read one value; at the top level a truncated container is closed."""
        try:
            return self._value()
        except _Eof as eof:
            self.truncated = True
            if isinstance(eof.partial, dict | list):
                return eof.partial
            raise _Bad("truncated before anything was complete") from None

    # -- values --------------------------------------------------------------------

    def _value(self) -> Any:
        self._skip()
        c = self._peek()
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        if c in _QUOTES:
            return self._string()
        if c in "-+.0123456789":
            return self._number()
        if c.isalpha() or c == "_":
            word = self._word()
            return _WORDS.get(word.lower(), word)
        raise _Bad(f"unexpected {c!r}")

    def _object(self) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        while True:
            self._skip(out)
            c = self._peek(out)
            if c == "}":
                self.i += 1
                return out
            if c == ",":
                self.i += 1
                continue
            key = self._key(out)
            self._skip(out)
            if self._peek(out) not in ":=":
                raise _Bad("expected ':' after a key")
            self.i += 1
            try:
                out[key] = self._value()
            except _Eof as eof:
                if eof.keep or isinstance(eof.partial, dict | list):
                    out[key] = eof.partial
                raise _Eof(out) from None

    def _array(self) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        while True:
            self._skip(out)
            c = self._peek(out)
            if c == "]":
                self.i += 1
                return out
            if c == ",":
                self.i += 1
                continue
            try:
                out.append(self._value())
            except _Eof:
                raise _Eof(out) from None  # half an element is dropped

    def _key(self, partial: dict[str, Any]) -> str:
        c = self._peek(partial)
        if c in _QUOTES:
            try:
                return self._string()
            except _Eof:
                raise _Eof(partial) from None
        start = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "_-$"):
            self.i += 1
        if self.i == start:
            raise _Bad(f"expected a key, got {c!r}")
        return self.s[start : self.i]

    def _string(self) -> str:
        quote = self.s[self.i]
        close = _QUOTES[quote]
        self.i += 1
        parts: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                parts.append(self._escape())
                continue
            if c == close:
                # A plain quote that is not followed by a delimiter is text that a
                # model forgot to escape (`'Tom's'`, `"he said "hi""`).
                rest = self.s[self.i + 1 : self.i + 40].lstrip(" \t")
                if quote in "\"'" and rest and rest[0] not in ",:}]=\n\r/#":
                    parts.append(c)
                    self.i += 1
                    continue
                self.i += 1
                return "".join(parts)
            parts.append(c)
            self.i += 1
        raise _Eof("".join(parts), keep=True)

    def _escape(self) -> str:
        nxt = self.s[self.i + 1]
        self.i += 2
        simple = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}
        if nxt in simple:
            return simple[nxt]
        if nxt == "u":
            digits = self.s[self.i : self.i + 4]
            if re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                self.i += 4
                return chr(int(digits, 16))
            return "u"
        return nxt  # \" \' \\ and anything else: the character itself

    def _number(self) -> Any:
        match = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?").match(self.s, self.i)
        if match is None:
            raise _Bad("not a number")
        self.i = match.end()
        if self.i >= len(self.s):
            raise _Eof()  # "0.7" at the very end may have been "0.75"
        text = match.group(0).lstrip("+")
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        return float(text)

    def _word(self) -> str:
        start = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "_-"):
            self.i += 1
        if self.i >= len(self.s):
            raise _Eof()
        return self.s[start : self.i]

    # -- whitespace, comments, the end -----------------------------------------------

    def _skip(self, partial: Any = None) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c.isspace():
                self.i += 1
            elif s.startswith("//", self.i) or c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end + 1
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                self.i = len(s) if end < 0 else end + 2
            else:
                return
        if partial is not None:
            raise _Eof(partial)

    def _peek(self, partial: Any = None) -> str:
        if self.i >= len(self.s):
            raise _Eof(partial)
        return self.s[self.i]


# -- values inside the JSON ------------------------------------------------------

_WORD_IMPORTANCE = {"low": 0.2, "minor": 0.2, "medium": 0.5, "moderate": 0.5, "high": 0.8}


def read_importance(value: Any, default: float = 0.5) -> float:
    """An importance in [0, 1] from what a model wrote (0.7, "0.7", 7 of 10, "high")."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _WORD_IMPORTANCE:
            return _WORD_IMPORTANCE[word]
        try:
            value = float(word.rstrip("%"))
        except ValueError:
            return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return default
    if value > 10:
        value /= 100
    elif value > 1:
        value /= 10
    return min(1.0, max(0.0, float(value)))


def normalise(text: str) -> str:
    """Case, punctuation and spacing folded: how two facts are told to be the same."""
    return " ".join(text.casefold().translate(_PUNCTUATION).split())
