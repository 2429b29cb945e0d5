"""Reading a SillyTavern chat file (`.jsonl`) into plain messages.

Pure functions: lines in (as `str` or `bytes`, e.g. an open file), dataclasses out.
Nothing here touches the store.

The file, as SillyTavern writes it (`src/endpoints/chats.js`: `chat.map(JSON.stringify)
.join('\\n')`), is compact JSON, one object a line, no trailing newline:

- line 1, the header: `{"user_name", "character_name", "create_date", "chat_metadata"}`.
  Group chats write `"unused"` for both names; very old files have no `chat_metadata`;
  old group chats have no header line at all (the first line is already a message).
- then one message a line: `name`, `is_user`, `is_system`, `send_date`, `mes`, and
  optionally `extra` (`api`, `model`, `type`, `reasoning`, ...), `swipes`, `swipe_id`,
  `swipe_info`, `gen_started`, `gen_finished`, `force_avatar`, `is_name`, ...

What becomes of each message:

- `is_user` -> role "user"; everything else -> role "assistant", with its `name` (so a
  narrator, `extra.type == "narrator"`, and each character of a group chat keep theirs).
- `mes` is the text. It is the chosen swipe already (SillyTavern writes the shown
  swipe into `mes`); the other `swipes` are alternatives the user rejected and are not
  imported.
- `is_system: true` on a story message means *hidden from the prompt* (`/hide`, the
  eye icon). Users hide old messages to save context, which is exactly the history a
  long-term memory should keep: such messages are kept, with `hidden=True`, and the
  caller decides.
- SillyTavern's own UI messages (help, welcome, `/comment` notes, ... : an
  `extra.type` other than "narrator") never reached a model: skipped, with a warning.
- A message with empty text is skipped, with a warning.

Dates (`send_date`, and the header's `create_date`) come in every format SillyTavern
wrote over the years; see `parse_st_date`. A date that cannot be read becomes `None`
with a warning; dates that go back in time are kept as written, with a warning.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from proxy.json_finite import loads_finite
from proxy.memory.records import MAX_DATE

__all__ = [
    "ChatHeader",
    "LineError",
    "LineWarning",
    "ParsedChat",
    "ParsedMessage",
    "iter_chat",
    "parse_chat",
    "parse_st_date",
]

# `extra.type` values (public/scripts/system-messages.js `system_message_types`) of
# messages SillyTavern shows in its UI but never sends to a model. "narrator" and
# "assistant_message" are story text and are kept; "group" is the old group-chat notice.
UI_MESSAGE_TYPES = frozenset(
    {
        "help",
        "welcome",
        "empty",
        "generic",
        "comment",
        "slash_commands",
        "formatting",
        "hotkeys",
        "macros",
        "welcome_prompt",
        "assistant_note",
        "group",
    }
)
NARRATOR_TYPE = "narrator"
GROUP_PLACEHOLDER_NAME = "unused"  # what group chats write in the header's name fields
HEADER_KEYS = ("user_name", "character_name", "chat_metadata", "create_date")

_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ),
        start=1,
    )
    for name in names
}
# getMessageTimeStamp() in SillyTavern 1.9-1.12: "June 19, 2023 2:20pm" (local time).
_MERIDIEM = re.compile(
    r"([A-Za-z]+)\.?\s+(\d{1,2}),\s*(\d{4})\s+(\d{1,2}):(\d{1,2})(?::(\d{1,2}))?\s*([ap]m)",
    re.IGNORECASE,
)
# humanizedDateTime() "2024-07-12@01h31m37s" (optionally "...s123ms"), and the older
# humanizedISO8601DateTime() "2023-6-5 @14h 56m 50s 682ms" (local time, unpadded).
_HUMANIZED = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})\s*@\s*(\d{1,2})h\s*(\d{1,2})m\s*(\d{1,2})s(?:\s*(\d{1,3})ms)?"
)
_DIGITS = re.compile(r"\d+(?:\.\d+)?")
# Below this an epoch number is taken as seconds, not milliseconds: 1e11 ms is March
# 1973, long before any chat app, while 1e11 s is the year 5138.
_SECONDS_BELOW = 1e11


@dataclass(frozen=True)
class ChatHeader:
    """The file's first line: who talks, and when the chat began."""

    user_name: str | None
    character_name: str | None
    created: float | None  # unix seconds
    metadata: dict[str, Any]  # `chat_metadata` as written (integrity, world_info, notes...)
    line: int


@dataclass(frozen=True)
class ParsedMessage:
    """One chat message, ready to import."""

    role: str  # "user" | "assistant"
    name: str | None  # the speaker as SillyTavern showed it (persona, character, narrator)
    text: str  # `mes`: the swipe the user kept
    date: float | None  # unix seconds; None when absent or unreadable
    line: int  # 1-based line number in the file
    hidden: bool = False  # `is_system`: hidden from the prompt in SillyTavern
    narrator: bool = False  # a /sys narrator message (role "assistant", its own name)


@dataclass(frozen=True)
class LineError:
    """A line that could not be read as a message; the others are still parsed."""

    line: int
    message: str


@dataclass(frozen=True)
class LineWarning:
    """Something odd about a line that did not stop it being read (or skipped)."""

    line: int
    message: str


ChatItem = ChatHeader | ParsedMessage | LineError | LineWarning


@dataclass
class ParsedChat:
    """A whole chat file: the header's facts, the messages in file order, and problems."""

    user_name: str | None = None
    character_name: str | None = None
    created: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[ParsedMessage] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    warnings: list[LineWarning] = field(default_factory=list)


def parse_chat(lines: Iterable[str | bytes], *, tz: tzinfo = UTC) -> ParsedChat:
    """Parse a SillyTavern chat file given as lines (an open file, `text.splitlines()`).

    Never raises on bad content: unreadable lines go to `errors`, oddities to
    `warnings`. `tz` is the zone of SillyTavern's date formats that carry none
    (the user's local time when written); UTC unless the caller knows better.
    """
    chat = ParsedChat()
    for item in iter_chat(lines, tz=tz):
        if isinstance(item, ParsedMessage):
            chat.messages.append(item)
        elif isinstance(item, LineError):
            chat.errors.append(item)
        elif isinstance(item, LineWarning):
            chat.warnings.append(item)
        else:
            chat.user_name = item.user_name
            chat.character_name = item.character_name
            chat.created = item.created
            chat.metadata = item.metadata
    return chat


def iter_chat(lines: Iterable[str | bytes], *, tz: tzinfo = UTC) -> Iterator[ChatItem]:
    """Stream a chat file: a `ChatHeader` if line 1 is one, then messages, errors and
    warnings in line order. Memory stays flat however long the file is."""
    first = True
    last_date: float | None = None
    last_date_line = 0
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield LineError(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                first = False
                continue
        if first:
            raw = raw.removeprefix("\ufeff")
        text = raw.strip()
        if not text:
            continue
        try:
            obj = loads_finite(text)
        except json.JSONDecodeError as exc:
            yield LineError(number, f"not JSON: {exc.msg} at column {exc.colno}")
            first = False
            continue
        except ValueError as exc:  # NaN, Infinity, 1e999
            yield LineError(number, f"not JSON: {exc}")
            first = False
            continue
        except RecursionError:
            yield LineError(number, "not JSON that can be read: nested too deeply")
            first = False
            continue
        if not isinstance(obj, dict):
            yield LineError(number, f"not a JSON object but {_json_kind(obj)}")
            first = False
            continue
        if first:
            first = False
            if "mes" not in obj and any(key in obj for key in HEADER_KEYS):
                yield from _header(obj, number, tz)
                continue
            yield LineWarning(number, "no header line: the file starts with a message")
        warnings: list[LineWarning] = []
        result = _message(obj, number, tz, warnings)
        yield from warnings
        if result is None:
            continue
        if isinstance(result, LineError):
            yield result
            continue
        if result.date is not None:
            if last_date is not None and result.date < last_date:
                yield LineWarning(
                    number,
                    f"send_date {_iso(result.date)} is earlier than line "
                    f"{last_date_line}'s {_iso(last_date)}",
                )
            last_date, last_date_line = result.date, number
        yield result


def parse_st_date(value: Any, *, tz: tzinfo = UTC) -> float | None:
    """A SillyTavern date as unix seconds, or None if it is none of the known formats.

    Known (as public/scripts/utils.js `parseTimestamp` reads them):
    - a number, or a string of digits: epoch milliseconds (`Date.now()`, the oldest
      chats and imports); a value below 1e11 is taken as seconds (third-party tools);
    - ISO 8601, "2025-09-26T07:04:12.006Z" (current versions), with or without zone;
    - "June 19, 2023 2:20pm" (getMessageTimeStamp, 1.9-1.12), local time;
    - "2024-07-12@01h31m37s" / "...37s123ms" (humanizedDateTime), local time;
    - "2023-6-5 @14h 56m 50s 682ms" (the old humanizedISO8601DateTime), local time.
    Local times are read in `tz`. A date before 1970 or after 9999 counts as unreadable:
    the store holds none (nor could its export be imported again).
    """
    seconds = _read_st_date(value, tz)
    return seconds if seconds is not None and 0 <= seconds <= MAX_DATE else None


def _read_st_date(value: Any, tz: tzinfo) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return _epoch(float(value))
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    if _DIGITS.fullmatch(text):
        return _epoch(float(text))
    try:
        return _stamp(datetime.fromisoformat(text), tz)
    except ValueError:
        pass
    match = _HUMANIZED.search(text)
    if match:
        year, month, day, hour, minute, second, millis = match.groups()
        return _build(tz, year, month, day, hour, minute, second, millis or "0")
    match = _MERIDIEM.search(text)
    if match:
        month_name, day, year, hour, minute, second, meridiem = match.groups()
        month = _MONTHS.get(month_name.lower())
        hour_12 = int(hour)
        if month is None or not 1 <= hour_12 <= 12:
            return None
        hour_24 = hour_12 % 12 + (12 if meridiem.lower() == "pm" else 0)
        return _build(tz, year, month, day, hour_24, minute, second or "0", "0")
    return None


def _header(obj: dict[str, Any], number: int, tz: tzinfo) -> Iterator[ChatItem]:
    created = None
    raw_date = obj.get("create_date")
    if raw_date not in (None, ""):
        created = parse_st_date(raw_date, tz=tz)
        if created is None:
            yield LineWarning(number, f"unreadable create_date {raw_date!r}")
    metadata = obj.get("chat_metadata")
    if metadata is not None and not isinstance(metadata, dict):
        yield LineWarning(number, f"chat_metadata is {_json_kind(metadata)}, not an object")
        metadata = None
    yield ChatHeader(
        user_name=_header_name(obj.get("user_name")),
        character_name=_header_name(obj.get("character_name")),
        created=created,
        metadata=metadata or {},
        line=number,
    )


def _header_name(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip() or value == GROUP_PLACEHOLDER_NAME:
        return None
    return value


def _message(
    obj: dict[str, Any], number: int, tz: tzinfo, warnings: list[LineWarning]
) -> ParsedMessage | LineError | None:
    if "mes" not in obj:
        return LineError(number, "no 'mes' field: not a chat message")
    text = obj["mes"]
    if not isinstance(text, str):
        return LineError(number, f"'mes' is {_json_kind(text)}, not a string")
    extra = obj.get("extra")
    kind = extra.get("type") if isinstance(extra, dict) else None
    if isinstance(kind, str) and kind in UI_MESSAGE_TYPES:
        warnings.append(LineWarning(number, f"skipped: SillyTavern {kind!r} system message"))
        return None
    if not text.strip():
        warnings.append(LineWarning(number, "skipped: empty message"))
        return None
    _check_swipe(obj, text, number, warnings)
    date = None
    raw_date = obj.get("send_date")
    if raw_date not in (None, ""):
        date = parse_st_date(raw_date, tz=tz)
        if date is None:
            warnings.append(LineWarning(number, f"unreadable send_date {raw_date!r}"))
    name = obj.get("name")
    return ParsedMessage(
        role="user" if obj.get("is_user") else "assistant",
        name=name if isinstance(name, str) and name else None,
        text=text,
        date=date,
        line=number,
        hidden=bool(obj.get("is_system")),
        narrator=kind == NARRATOR_TYPE and not obj.get("is_user"),
    )


def _check_swipe(obj: dict[str, Any], text: str, number: int, warnings: list[LineWarning]) -> None:
    """`mes` is the kept swipe; say so when the file disagrees with itself."""
    swipes, swipe_id = obj.get("swipes"), obj.get("swipe_id")
    if not isinstance(swipes, list) or not swipes or swipe_id is None:
        return
    if not isinstance(swipe_id, int) or isinstance(swipe_id, bool):
        warnings.append(LineWarning(number, f"swipe_id {swipe_id!r} is not a number; kept 'mes'"))
    elif not 0 <= swipe_id < len(swipes):
        warnings.append(
            LineWarning(number, f"swipe_id {swipe_id} outside {len(swipes)} swipes; kept 'mes'")
        )
    elif isinstance(swipes[swipe_id], str) and swipes[swipe_id] != text:
        warnings.append(LineWarning(number, f"'mes' differs from swipe {swipe_id}; kept 'mes'"))


def _epoch(number: float) -> float | None:
    if not math.isfinite(number) or number < 0:
        return None
    seconds = number if number < _SECONDS_BELOW else number / 1000.0
    return seconds if seconds <= MAX_DATE else None


def _stamp(moment: datetime, tz: tzinfo) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()


def _build(tz: tzinfo, *parts: str | int) -> float | None:
    year, month, day, hour, minute, second, millis = (int(part) for part in parts)
    try:
        moment = datetime(year, month, day, hour, minute, second, millis * 1000, tzinfo=tz)
    except ValueError:
        return None
    return moment.timestamp()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _json_kind(value: Any) -> str:
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
