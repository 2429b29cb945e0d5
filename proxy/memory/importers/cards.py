"""Reading a character card (PNG or JSON) into a plain `Card`.

Pure functions: bytes in, a dataclass out, `CardError` (an `Invalid`, so a
`ValueError`) when the bytes hold no usable card. No Pillow: PNG chunks are walked
with `struct` + `zlib`.

The formats, as the specs and SillyTavern (`src/character-card-parser.js`) have them:

- V1 (`spec_v1.md`): a JSON object with `name, description, personality, scenario,
  first_mes, mes_example` at top level. The older Pygmalion/TavernAI names
  (`char_name, char_persona, world_scenario, char_greeting, example_dialogue`) are
  read as V1 too.
- V2 (`spec_v2.md`): `{"spec": "chara_card_v2", "spec_version": "2.0", "data": {...}}`,
  the V1 fields plus `creator_notes, system_prompt, post_history_instructions,
  alternate_greetings, character_book, tags, creator, character_version, extensions`
  inside `data`. SillyTavern also copies the V1 fields to the top level; `data` wins.
- V3 (`SPEC_V3.md`): `"spec": "chara_card_v3"`, `"spec_version": "3.0"`, the V2 `data`
  plus `nickname, group_only_greetings, assets, creator_notes_multilingual, ...`.
- PNG: the card JSON, UTF-8 then base64, in a `tEXt` chunk with keyword `chara`
  (V1/V2) and/or `ccv3` (V3). SillyTavern writes both just before `IEND`; when both
  exist `ccv3` is used. Keywords are compared case-insensitively, as SillyTavern does.
  `iTXt` and `zTXt` chunks with those keywords are read too.

A PNG whose preferred chunk is broken (bad CRC, bad base64 or JSON, unknown spec)
falls back to the other chunk, and says so in `Card.warnings`; only when no chunk
gives a card is `CardError` raised, naming every problem found.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.json_finite import loads_finite
from proxy.memory.errors import Invalid

__all__ = [
    "BookEntry",
    "Card",
    "CardError",
    "card_from_json",
    "card_placeholders",
    "parse_card",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # in order of preference
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_TEXT_BYTES = 64 * 1024 * 1024  # a compressed text chunk may not inflate past this
KNOWN_SPECS = {"chara_card_v2": ("v2", 2.0), "chara_card_v3": ("v3", 3.0)}
DEFAULT_INSERTION_ORDER = 100  # SillyTavern's default world-info `order`

_PLACEHOLDER = re.compile(r"\{\{(char|user)\}\}|<(bot|char|user)>", re.IGNORECASE)
_URLSAFE = str.maketrans("-_", "+/")
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a ZIP archive (CHARX cards are not supported)"),
)


class CardError(Invalid):
    """The bytes hold no usable character card; the message says why, for a person."""


@dataclass(frozen=True)
class BookEntry:
    """One lorebook entry of the card's `character_book`."""

    keys: list[str]
    content: str
    enabled: bool = True
    comment: str = ""  # the entry's title in SillyTavern; never sent to a model
    constant: bool = False  # always inserted, whatever the keys
    insertion_order: int = DEFAULT_INSERTION_ORDER  # lower = earlier in the prompt
    secondary_keys: list[str] = field(default_factory=list)
    selective: bool = False  # needs a secondary key as well


@dataclass(frozen=True)
class Card:
    """A character card, whatever its version, with every text as the card has it
    (placeholders like {{char}} unreplaced: see `card_placeholders`)."""

    spec: str  # "v1" | "v2" | "v3"
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    system_prompt: str = ""
    post_history_instructions: str = ""
    creator_notes: str = ""
    tags: list[str] = field(default_factory=list)
    book: list[BookEntry] = field(default_factory=list)
    book_name: str | None = None
    creator: str = ""
    character_version: str = ""
    nickname: str | None = None  # V3: replaces the name in {{char}} when set
    warnings: list[str] = field(default_factory=list)


def parse_card(data: bytes, filename: str | None = None) -> Card:
    """Read a card from a PNG (card in a text chunk) or a JSON file's bytes.

    The format is told by the content, not by `filename`, which only names the
    file in messages. Raises `CardError` when there is no usable card.
    """
    where = f"{filename}: " if filename else ""
    if not data:
        raise CardError(f"{where}the file is empty")
    if data.startswith(PNG_SIGNATURE):
        return _card_from_png(data, where)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise CardError(f"{where}a WEBP image; only PNG and JSON cards are supported")
    for magic, what in _OTHER_FORMATS:
        if data.startswith(magic):
            raise CardError(f"{where}{what}, not a PNG or JSON character card")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CardError(f"{where}neither a PNG image nor JSON text") from None
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        raise CardError(f"{where}neither a PNG image nor JSON text")
    try:
        obj = loads_finite(stripped)
    except json.JSONDecodeError as exc:
        raise CardError(
            f"{where}invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # NaN, Infinity, 1e999
        raise CardError(f"{where}invalid JSON: {exc}") from None
    except RecursionError:
        raise CardError(f"{where}JSON nested too deeply") from None
    return card_from_json(obj, where=where)


def card_from_json(obj: Any, *, where: str = "") -> Card:
    """A `Card` from an already-decoded card object (V1, V2 or V3)."""
    warnings: list[str] = []
    if not isinstance(obj, dict):
        raise CardError(f"{where}the card JSON is {_kind(obj)}, not an object")
    spec = obj.get("spec")
    version = "v1"
    fields: dict[str, Any] = obj
    if spec in (None, ""):
        if isinstance(obj.get("data"), dict) and "name" not in obj:
            fields, version = obj["data"], "v2"
            warnings.append("no 'spec' field; read the 'data' object as a V2 card")
        elif "name" not in obj and "char_name" in obj:
            fields = _from_pygmalion(obj)
    elif not isinstance(spec, str):
        raise CardError(f"{where}'spec' is {_kind(spec)}, not 'chara_card_v2' or 'chara_card_v3'")
    elif spec in KNOWN_SPECS:
        version, known = KNOWN_SPECS[spec]
        data = obj.get("data")
        if not isinstance(data, dict):
            raise CardError(f"{where}a {spec} card without a 'data' object")
        fields = data
        _check_spec_version(obj.get("spec_version"), known, warnings)
    elif spec.startswith(("lorebook", "world")):
        raise CardError(f"{where}a lorebook ({spec!r}), not a character card")
    else:
        raise CardError(
            f"{where}unknown card spec {spec!r}; known: chara_card_v2, chara_card_v3 "
            "and V1 (no spec)"
        )
    name = _text(fields, "name", warnings).strip()
    if not name and fields is not obj:
        name = _text(obj, "name", warnings).strip()  # SillyTavern's top-level V1 copy
    if not name:
        raise CardError(f"{where}the card has no name")
    creator_notes = _text(fields, "creator_notes", warnings)
    if not creator_notes:
        multilingual = fields.get("creator_notes_multilingual")
        if isinstance(multilingual, dict) and isinstance(multilingual.get("en"), str):
            creator_notes = multilingual["en"]
        elif version == "v1":
            creator_notes = _text(obj, "creatorcomment", warnings)  # SillyTavern's V1 name
    book_name, book = _book(fields.get("character_book"), warnings)
    nickname = fields.get("nickname")
    return Card(
        spec=version,
        name=name,
        description=_text(fields, "description", warnings),
        personality=_text(fields, "personality", warnings),
        scenario=_text(fields, "scenario", warnings),
        first_mes=_text(fields, "first_mes", warnings),
        mes_example=_text(fields, "mes_example", warnings),
        alternate_greetings=_strings(fields.get("alternate_greetings"), split=False),
        system_prompt=_text(fields, "system_prompt", warnings),
        post_history_instructions=_text(fields, "post_history_instructions", warnings),
        creator_notes=creator_notes,
        tags=_strings(fields.get("tags"), split=True),
        book=book,
        book_name=book_name,
        creator=_text(fields, "creator", warnings),
        character_version=_text(fields, "character_version", warnings),
        nickname=nickname.strip() if isinstance(nickname, str) and nickname.strip() else None,
        warnings=warnings,
    )


def card_placeholders(text: str, char: str, user: str) -> str:
    """Replace {{char}} / <BOT> / <char> with `char` and {{user}} / <USER> with `user`,
    case-insensitively, as the V1 and V3 specs ask. Other macros are left alone."""

    def replace(match: re.Match[str]) -> str:
        word = (match.group(1) or match.group(2)).lower()
        return user if word == "user" else char

    return _PLACEHOLDER.sub(replace, text)


# --- PNG ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextChunk:
    keyword: str  # lower case
    kind: str  # "tEXt" | "zTXt" | "iTXt"
    offset: int
    text: str | None  # None: see `problem`
    problem: str | None = None

    def label(self) -> str:
        return f"{self.kind} chunk {self.keyword!r} at byte {self.offset}"


def _card_from_png(data: bytes, where: str) -> Card:
    chunks, damage = _read_chunks(data)
    problems: list[str] = []
    for keyword in CARD_KEYWORDS:
        for chunk in (c for c in chunks if c.keyword == keyword):
            if chunk.text is None:
                problems.append(f"{chunk.label()}: {chunk.problem}")
                continue
            try:
                card = card_from_json(_decode_value(chunk.text))
            except CardError as exc:
                problems.append(f"{chunk.label()}: {exc}")
                continue
            notes = [*problems, *([damage] if damage else [])]
            return replace(card, warnings=[*notes, *card.warnings]) if notes else card
    if problems:
        raise CardError(f"{where}no readable character card in the PNG: " + "; ".join(problems))
    if damage:
        raise CardError(f"{where}{damage}, and no character card was found before the damage")
    raise CardError(
        f"{where}a PNG without a character card (no 'chara' or 'ccv3' text chunk): "
        "a plain image, or one whose metadata was stripped"
    )


def _read_chunks(data: bytes) -> tuple[list[_TextChunk], str | None]:
    """The card text chunks of a PNG, and what is wrong with the file's structure."""
    found: list[_TextChunk] = []
    pos, size = len(PNG_SIGNATURE), len(data)
    while True:
        if pos == size:
            return found, f"the PNG ends at byte {pos} without an IEND chunk (truncated?)"
        if size - pos < 12:
            return found, f"the PNG is truncated at byte {pos} (a partial chunk header)"
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if not ctype.isalpha():
            return found, f"the PNG is corrupt at byte {pos} (not a chunk header)"
        name = ctype.decode("ascii")
        end = pos + 12 + length
        if end > size:
            return found, (
                f"the PNG is truncated: chunk {name!r} at byte {pos} declares {length} "
                f"bytes but only {max(size - pos - 12, 0)} remain"
            )
        if ctype in TEXT_CHUNKS:
            chunk = _text_chunk(name, data[pos + 8 : pos + 8 + length], data[end - 4 : end], pos)
            if chunk is not None:
                found.append(chunk)
        if ctype == b"IEND":
            return found, None
        pos = end


def _text_chunk(kind: str, body: bytes, crc: bytes, offset: int) -> _TextChunk | None:
    """A card text chunk (None for other keywords), decoded or with its problem."""
    keyword_bytes, sep, rest = body.partition(b"\0")
    keyword = keyword_bytes.decode("latin-1").lower()
    if keyword not in CARD_KEYWORDS:
        return None
    stored = struct.unpack(">I", crc)[0]
    computed = zlib.crc32(kind.encode("ascii") + body)
    if stored != computed:
        problem = f"bad CRC (stored {stored:08x}, computed {computed:08x}): the chunk is damaged"
        return _TextChunk(keyword, kind, offset, None, problem)
    if not sep:
        return _TextChunk(keyword, kind, offset, None, "no NUL after the keyword")
    try:
        text = _chunk_text(kind, rest)
    except CardError as exc:
        return _TextChunk(keyword, kind, offset, None, str(exc))
    return _TextChunk(keyword, kind, offset, text)


def _chunk_text(kind: str, rest: bytes) -> str:
    if kind == "tEXt":
        return rest.decode("latin-1")
    if kind == "zTXt":
        if not rest or rest[0] != 0:
            raise CardError("unknown zTXt compression method")
        return _inflate(rest[1:]).decode("latin-1")
    # iTXt: flag, method, language tag NUL, translated keyword NUL, UTF-8 text.
    if len(rest) < 2:
        raise CardError("iTXt chunk too short")
    flag, method = rest[0], rest[1]
    parts = rest[2:].split(b"\0", 2)
    if len(parts) != 3:
        raise CardError("iTXt chunk without its language and translated-keyword fields")
    payload = parts[2]
    if flag:
        if method != 0:
            raise CardError("unknown iTXt compression method")
        payload = _inflate(payload)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CardError("iTXt text is not UTF-8") from None


def _inflate(payload: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, MAX_TEXT_BYTES)
    except zlib.error as exc:
        raise CardError(f"compressed text is corrupt ({exc})") from None
    if inflater.unconsumed_tail:
        raise CardError(f"compressed text inflates past {MAX_TEXT_BYTES} bytes")
    if not inflater.eof:
        raise CardError("compressed text is truncated")
    return out


def _decode_value(text: str) -> Any:
    """The card object in a chunk's text: base64 of UTF-8 JSON (plain JSON accepted)."""
    value = text.strip()
    if not value.startswith("{"):
        compact = "".join(value.split()).translate(_URLSAFE)
        compact += "=" * (-len(compact) % 4)
        try:
            raw = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise CardError("not valid base64") from None
        try:
            value = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CardError("base64 that does not decode to UTF-8 text") from None
    try:
        return loads_finite(value)
    except json.JSONDecodeError as exc:
        raise CardError(
            f"invalid JSON inside ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError as exc:  # NaN, Infinity, 1e999
        raise CardError(f"invalid JSON inside ({exc})") from None
    except RecursionError:
        raise CardError("JSON inside nested too deeply") from None


# --- fields ------------------------------------------------------------------------


def _from_pygmalion(obj: dict[str, Any]) -> dict[str, Any]:
    names = {
        "char_name": "name",
        "char_persona": "description",
        "world_scenario": "scenario",
        "char_greeting": "first_mes",
        "example_dialogue": "mes_example",
    }
    fields = dict(obj)
    for old, new in names.items():
        if old in obj and new not in obj:
            fields[new] = obj[old]
    return fields


def _check_spec_version(value: Any, known: float, warnings: list[str]) -> None:
    if value is None:
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        warnings.append(f"unreadable spec_version {value!r}")
        return
    if math.isfinite(number) and int(number) == int(known) and number > known:
        warnings.append(f"spec_version {value} is newer than {known}; unknown fields ignored")


def _text(fields: dict[str, Any], key: str, warnings: list[str]) -> str:
    value = fields.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    warnings.append(f"'{key}' is {_kind(value)}, not text; ignored")
    return ""


def _strings(value: Any, *, split: bool) -> list[str]:
    """A list of non-empty strings; a single string is split on commas if `split`."""
    if isinstance(value, str):
        items: list[Any] = value.split(",") if split else [value]
    elif isinstance(value, list):
        items = value
    else:
        return []
    out = [item.strip() if split else item for item in items if isinstance(item, str)]
    return [item for item in out if item.strip()]


def _book(raw: Any, warnings: list[str]) -> tuple[str | None, list[BookEntry]]:
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        warnings.append(f"character_book is {_kind(raw)}, not an object; ignored")
        return None, []
    name = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else None
    entries = raw.get("entries")
    if isinstance(entries, dict):  # SillyTavern world-info shape: {"0": {...}, "1": {...}}
        entries = list(entries.values())
    if not isinstance(entries, list):
        warnings.append("character_book has no 'entries' list; ignored")
        return name, []
    book: list[BookEntry] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            warnings.append(f"character_book entry {index} has no text content; skipped")
            continue
        book.append(_entry(entry, index, warnings))
    return name, book


def _entry(entry: dict[str, Any], index: int, warnings: list[str]) -> BookEntry:
    # `disable` is SillyTavern's world-info name for the opposite of `enabled`.
    enabled = bool(entry["enabled"]) if "enabled" in entry else not entry.get("disable", False)
    order = entry.get("insertion_order", entry.get("order", DEFAULT_INSERTION_ORDER))
    if isinstance(order, bool) or not isinstance(order, int | float) or not math.isfinite(order):
        warnings.append(f"character_book entry {index}: insertion_order {order!r} not a number")
        order = DEFAULT_INSERTION_ORDER
    comment = entry.get("comment") or entry.get("name") or ""
    return BookEntry(
        keys=_strings(entry.get("keys", entry.get("key")), split=True),
        content=entry["content"],
        enabled=enabled,
        comment=comment if isinstance(comment, str) else "",
        constant=bool(entry.get("constant", False)),
        insertion_order=int(order),
        secondary_keys=_strings(entry.get("secondary_keys", entry.get("keysecondary")), split=True),
        selective=bool(entry.get("selective", False)),
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
