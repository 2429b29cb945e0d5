"""Importers: SillyTavern chat files and character cards, on inputs shaped like real ones.

Chat lines are written as SillyTavern writes them (`JSON.stringify` per message, compact,
non-ASCII unescaped, joined with "\\n", no trailing newline). PNG cards are built chunk
by chunk with the layout SillyTavern's `character-card-parser.js` produces: signature,
IHDR, IDAT, then the `chara` and `ccv3` tEXt chunks just before IEND.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from proxy.memory.importers import (
    CardError,
    ParsedMessage,
    card_placeholders,
    iter_chat,
    parse_card,
    parse_chat,
    parse_st_date,
)

# --- helpers -----------------------------------------------------------------------


def st_line(obj: dict[str, Any]) -> str:
    """One line as SillyTavern's `JSON.stringify` writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def st_file(*objs: dict[str, Any]) -> str:
    return "\n".join(st_line(obj) for obj in objs)


def ts(*args: int, tz: timezone = UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_image(width: int = 4, height: int = 4) -> tuple[bytes, bytes]:
    """The signature + IHDR + IDAT of a small RGBA image, and its IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes([200, 120, 80, 255]) * width for _ in range(height))
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
    return head, chunk(b"IEND", b"")


def text_chunk(keyword: str, card: dict[str, Any] | str) -> bytes:
    value = card if isinstance(card, str) else b64_json(card)
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + value.encode("latin-1"))


def b64_json(obj: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(obj, ensure_ascii=False).encode("utf-8")).decode("ascii")


def png_card(*chunks: bytes) -> bytes:
    head, iend = png_image()
    return head + b"".join(chunks) + iend


# --- SillyTavern chats ---------------------------------------------------------------

HEADER = {
    "user_name": "Mara",
    "character_name": "Seraphina",
    "create_date": "2025-09-26@15h04m33s",
    "chat_metadata": {
        "integrity": "1e6905db-bab6-4901-913b-06d18cab5a8f",
        "tainted": False,
        "world_info": "Eldoria",
        "note_prompt": "",
        "note_interval": 1,
        "attachments": [],
    },
}

GREETINGS = [
    '*She turns, her gown shimmering in the soft light.* "Welcome to Eldoria, traveler."',
    '*A soft glow surrounds her as she tilts her head.* "You are far from the road, aren\'t you?"',
]


def current_chat() -> str:
    """A chat as SillyTavern 1.13 saves it: ISO dates, swipes with swipe_info."""
    return st_file(
        HEADER,
        {
            "name": "Seraphina",
            "is_user": False,
            "is_system": False,
            "send_date": "2025-09-26T07:04:12.006Z",
            "mes": GREETINGS[1],
            "extra": {},
            "swipe_id": 1,
            "swipes": GREETINGS,
            "swipe_info": [
                {"send_date": "2025-09-26T07:04:12.006Z", "extra": {}},
                {"send_date": "2025-09-26T07:04:12.006Z", "extra": {}},
            ],
        },
        {
            "name": "Mara",
            "is_user": True,
            "is_system": False,
            "send_date": "2025-09-26T07:06:02.345Z",
            "mes": "Who are you? Ça va?",
            "extra": {"isSmallSys": False},
            "force_avatar": "User Avatars/user-default.png",
        },
        {
            "name": "Seraphina",
            "is_user": False,
            "is_system": False,
            "send_date": "2025-09-26T07:06:09.101Z",
            "mes": '"I am Seraphina, guardian of this forest."',
            "gen_started": "2025-09-26T07:06:03.000Z",
            "gen_finished": "2025-09-26T07:06:09.101Z",
            "extra": {
                "api": "openai",
                "model": "gpt-4o",
                "reasoning": "The user asks for my name.",
                "token_count": 14,
            },
            "swipe_id": 0,
            "swipes": ['"I am Seraphina, guardian of this forest."', '"A friend."'],
            "swipe_info": [
                {"send_date": "2025-09-26T07:06:09.101Z", "extra": {"api": "openai"}},
                {"send_date": "2025-09-26T07:07:30.000Z", "extra": {"api": "openai"}},
            ],
        },
    )


def test_current_chat_header_roles_swipes_and_dates() -> None:
    chat = parse_chat(current_chat().splitlines())

    assert (chat.user_name, chat.character_name) == ("Mara", "Seraphina")
    assert chat.created == ts(2025, 9, 26, 15, 4, 33)
    assert chat.metadata["integrity"] == "1e6905db-bab6-4901-913b-06d18cab5a8f"
    assert chat.errors == [] and chat.warnings == []
    assert [(m.role, m.name, m.line) for m in chat.messages] == [
        ("assistant", "Seraphina", 2),
        ("user", "Mara", 3),
        ("assistant", "Seraphina", 4),
    ]
    # Only the chosen swipe is the message: the greeting the user swiped to, not the first.
    assert chat.messages[0].text == GREETINGS[1]
    assert chat.messages[1].text == "Who are you? Ça va?"
    assert chat.messages[2].text == '"I am Seraphina, guardian of this forest."'
    assert "A friend." not in {m.text for m in chat.messages}
    assert chat.messages[1].date == pytest.approx(ts(2025, 9, 26, 7, 6, 2) + 0.345)
    assert not any(m.hidden or m.narrator for m in chat.messages)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Date.now() in the oldest chats (the Aqua sample chat in SillyTavern's repo).
        (1674563371558, 1674563371.558),
        ("1674563371558", 1674563371.558),
        # Third-party tools writing epoch seconds.
        (1714651200, 1714651200.0),
        ("2025-09-26T07:04:12.006Z", ts(2025, 9, 26, 7, 4, 12) + 0.006),
        ("2024-05-02T12:01:00+02:00", ts(2024, 5, 2, 10, 1)),
        ("2025-01-16 10:00:15", ts(2025, 1, 16, 10, 0, 15)),
        # getMessageTimeStamp(), SillyTavern 1.9-1.12.
        ("June 19, 2023 2:20pm", ts(2023, 6, 19, 14, 20)),
        ("November 21, 2026 9:15am", ts(2026, 11, 21, 9, 15)),
        ("January 1, 2024 12:05am", ts(2024, 1, 1, 0, 5)),
        ("August 3, 2024 12:30pm", ts(2024, 8, 3, 12, 30)),
        # humanizedDateTime() and the old humanizedISO8601DateTime().
        ("2024-07-12@01h31m37s", ts(2024, 7, 12, 1, 31, 37)),
        ("2024-07-12@01h31m37s123ms", ts(2024, 7, 12, 1, 31, 37) + 0.123),
        ("2023-6-5 @14h 56m 50s 682ms", ts(2023, 6, 5, 14, 56, 50) + 0.682),
        ("2024-1-4 @19h 06m 48s 932ms", ts(2024, 1, 4, 19, 6, 48) + 0.932),
    ],
)
def test_send_date_formats(value: object, expected: float) -> None:
    assert parse_st_date(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        *(None, "", True, "yesterday", "February 30, 2024 1:00pm", "Smarch 3, 2024 1:00pm", {}),
        *(-5, "-1e300", float("nan"), float("inf")),
        # Outside the dates the store holds (1970 to 9999): its export could not be
        # imported again.
        *("1969-07-20T20:17:00Z", "0001-01-01", "9999-12-31T23:59:59-05:00"),
    ],
)
def test_unreadable_dates_are_none(value: object) -> None:
    assert parse_st_date(value) is None


def test_local_formats_are_read_in_the_given_zone() -> None:
    paris = timezone(timedelta(hours=2))
    assert parse_st_date("June 19, 2023 2:20pm", tz=paris) == ts(2023, 6, 19, 12, 20)
    assert parse_st_date("2024-07-12@01h31m37s", tz=paris) == ts(2024, 7, 11, 23, 31, 37)
    # A date with its own zone or an epoch does not move.
    assert parse_st_date("2025-09-26T07:04:12Z", tz=paris) == ts(2025, 9, 26, 7, 4, 12)
    assert parse_st_date(1674563371558, tz=paris) == 1674563371.558


def test_chat_spanning_upgrades_mixes_date_formats() -> None:
    text = st_file(
        {"user_name": "You", "character_name": "Aqua", "create_date": 1674559896839},
        {"name": "Aqua", "is_user": False, "is_name": True, "send_date": 1674563371558,
         "mes": "*strikes a pose* Are you new here?"},
        {"name": "You", "is_user": True, "is_name": True, "send_date": "June 19, 2023 2:20pm",
         "mes": "I am."},
        {"name": "Aqua", "is_user": False, "send_date": "2024-07-12@01h31m37s",
         "mes": "Then follow me!"},
        {"name": "You", "is_user": True, "send_date": "the day after", "mes": "Wait!"},
        {"name": "Aqua", "is_user": False, "send_date": "2025-09-26T07:04:12.006Z",
         "mes": "Too slow!"},
        {"name": "You", "is_user": True, "send_date": "2025-09-25T07:00:00.000Z",
         "mes": "Edited later."},
    )  # fmt: skip
    chat = parse_chat(text.splitlines())

    assert chat.created == pytest.approx(1674559896.839)
    assert [m.date for m in chat.messages] == [
        pytest.approx(1674563371.558),
        ts(2023, 6, 19, 14, 20),
        ts(2024, 7, 12, 1, 31, 37),
        None,
        pytest.approx(ts(2025, 9, 26, 7, 4, 12) + 0.006),
        ts(2025, 9, 25, 7, 0, 0),
    ]
    assert [m.text for m in chat.messages][-1] == "Edited later."  # kept where written
    assert chat.errors == []
    assert [(w.line, w.message) for w in chat.warnings] == [
        (5, "unreadable send_date 'the day after'"),
        (
            7,
            "send_date 2025-09-25T07:00:00+00:00 is earlier than line 6's "
            "2025-09-26T07:04:12+00:00",
        ),
    ]


def test_malformed_lines_are_reported_and_the_rest_parsed() -> None:
    good = {"name": "Seraphina", "is_user": False, "send_date": "2025-09-26T07:04:12.006Z"}
    lines = [
        st_line(HEADER),
        st_line({**good, "mes": "First."}),
        '{"name":"Mara","is_user":true,"send_date":"2025-09-26T07:05:00.000Z","mes":"cut o',
        "[1,2,3]",
        st_line({"name": "Mara", "is_user": True, "send_date": "2025-09-26T07:05:00.000Z"}),
        st_line({**good, "mes": None}),
        "",
        st_line({**good, "send_date": "2025-09-26T07:09:00.000Z", "mes": "Last."}),
    ]
    chat = parse_chat(lines)

    assert [(m.line, m.text) for m in chat.messages] == [(2, "First."), (8, "Last.")]
    assert [e.line for e in chat.errors] == [3, 4, 5, 6]
    assert chat.errors[0].message.startswith("not JSON: Unterminated string")
    assert chat.errors[1].message == "not a JSON object but an array"
    assert chat.errors[2].message == "no 'mes' field: not a chat message"
    assert chat.errors[3].message == "'mes' is null, not a string"


def test_bytes_lines_with_bom_crlf_and_a_bad_byte() -> None:
    data = (
        "\ufeff"
        + st_line(HEADER)
        + "\r\n"
        + st_line({"name": "Mara", "is_user": True, "send_date": 1758870000000, "mes": "Héllo"})
        + "\r\n"
    ).encode("utf-8")
    latin1 = b'{"name":"Mara","is_user":true,"mes":"caf\xe9"}'  # saved by some other editor
    chat = parse_chat((data + latin1 + b"\r\n").splitlines(keepends=True))

    assert chat.character_name == "Seraphina"
    assert [(m.text, m.date) for m in chat.messages] == [("Héllo", 1758870000.0)]
    assert [(e.line, e.message) for e in chat.errors] == [
        (3, f"not UTF-8 text (invalid continuation byte at byte {latin1.index(0xE9)})")
    ]


def test_hidden_narrator_and_ui_messages() -> None:
    text = st_file(
        HEADER,
        # Hidden with /hide to save context: still history worth remembering.
        {"name": "Mara", "is_user": True, "is_system": True,
         "send_date": "2025-09-26T07:06:02.345Z", "mes": "My sister is called Ilse."},
        # /sys narrator message, visible.
        {"name": "System", "is_user": False, "is_system": False,
         "send_date": "2025-09-26T07:07:00.000Z", "mes": "Night falls over Eldoria.",
         "force_avatar": "img/five.png",
         "extra": {"type": "narrator", "bias": None, "gen_id": 1758870420000,
                   "isSmallSys": False, "api": "manual", "model": "slash command"}},
        # /comment: shown in the UI, never sent to a model.
        {"name": "System", "is_user": False, "is_system": True,
         "send_date": "2025-09-26T07:08:00.000Z", "mes": "note to self: tone down the rain",
         "extra": {"type": "comment", "gen_id": 1758870480000}},
        # A failed generation leaves an empty message.
        {"name": "Seraphina", "is_user": False, "send_date": "2025-09-26T07:09:00.000Z",
         "mes": "", "extra": {"api": "openai"}},
        {"name": "Seraphina", "is_user": False, "send_date": "2025-09-26T07:10:00.000Z",
         "mes": "*She lights a lantern.*", "extra": {"api": "openai", "model": "gpt-4o"}},
    )  # fmt: skip
    chat = parse_chat(text.splitlines())

    assert [(m.role, m.name, m.hidden, m.narrator) for m in chat.messages] == [
        ("user", "Mara", True, False),
        ("assistant", "System", False, True),
        ("assistant", "Seraphina", False, False),
    ]
    assert chat.messages[0].text == "My sister is called Ilse."
    assert [(w.line, w.message) for w in chat.warnings] == [
        (4, "skipped: SillyTavern 'comment' system message"),
        (5, "skipped: empty message"),
    ]


def test_group_chat_header_and_headerless_old_group_chat() -> None:
    members = [
        {"name": "Seraphina", "is_user": False, "send_date": "2025-09-26T07:04:12.006Z",
         "mes": "Welcome.", "is_group": True},
        {"name": "Mara", "is_user": True, "send_date": "2025-09-26T07:05:00.000Z",
         "mes": "Hello both."},
        {"name": "Brom", "is_user": False, "send_date": "2025-09-26T07:05:09.000Z",
         "mes": "Hmph.", "is_group": True},
    ]  # fmt: skip
    header = {
        "chat_metadata": {"integrity": "x"},
        "user_name": "unused",
        "character_name": "unused",
    }
    chat = parse_chat(st_file(header, *members).splitlines())
    assert (chat.user_name, chat.character_name) == (None, None)
    assert [m.name for m in chat.messages] == ["Seraphina", "Mara", "Brom"]
    assert chat.warnings == []

    old = parse_chat(st_file(*members).splitlines())
    assert [(m.name, m.line) for m in old.messages] == [("Seraphina", 1), ("Mara", 2), ("Brom", 3)]
    assert [w.message for w in old.warnings] == ["no header line: the file starts with a message"]


def test_swipe_that_disagrees_with_mes_keeps_mes_and_warns() -> None:
    line = {"name": "Seraphina", "is_user": False, "send_date": 1758870000000, "mes": "Edited.",
            "swipe_id": 0, "swipes": ["Original.", "Other."]}  # fmt: skip
    chat = parse_chat(st_file(HEADER, line).splitlines())
    assert [m.text for m in chat.messages] == ["Edited."]
    assert [w.message for w in chat.warnings] == ["'mes' differs from swipe 0; kept 'mes'"]


def long_chat(count: int) -> Iterator[str]:
    yield st_line(HEADER)
    start = ts(2025, 1, 1)
    for index in range(count):
        is_user = index % 2 == 1
        text = f"Message {index}: " + "the lantern flickers and the rain goes on. " * 12
        yield st_line(
            {
                "name": "Mara" if is_user else "Seraphina",
                "is_user": is_user,
                "is_system": False,
                "send_date": datetime.fromtimestamp(start + 60 * index, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "mes": text,
                "extra": {} if is_user else {"api": "openai", "model": "gpt-4o", "reasoning": ""},
                **({} if is_user else {"swipe_id": 0, "swipes": [text], "swipe_info": [{}]}),
            }
        )


def test_five_thousand_messages_parse_quickly() -> None:
    lines = list(long_chat(5000))
    started = time.perf_counter()
    chat = parse_chat(lines)
    elapsed = time.perf_counter() - started

    assert len(chat.messages) == 5000 and chat.errors == [] and chat.warnings == []
    assert chat.messages[-1].date == ts(2025, 1, 1) + 60 * 4999
    assert elapsed < 2.0, f"5,000 messages took {elapsed:.2f}s"


def test_iter_chat_streams_from_a_lazy_source() -> None:
    source = long_chat(10_000)
    items = iter_chat(source)
    header = next(items)
    first = next(items)
    assert getattr(header, "character_name", None) == "Seraphina"
    assert isinstance(first, ParsedMessage) and first.line == 2
    # Only what was asked for has been read from the source.
    assert next(source).startswith('{"name":"Mara"')


# --- character cards -------------------------------------------------------------------

BOOK = {
    "name": "Eldoria",
    "description": "",
    "scan_depth": 4,
    "token_budget": 512,
    "recursive_scanning": False,
    "extensions": {},
    "entries": [
        {
            "id": 0,
            "keys": ["eldoria", "forest", "magical forest"],
            "secondary_keys": [],
            "comment": "eldoria",
            "content": '{{user}}: "What is Eldoria?"\n'
            '{{char}}: "Eldoria is here, all of the woods."',
            "constant": False,
            "selective": True,
            "insertion_order": 100,
            "enabled": True,
            "position": "before_char",
            "use_regex": True,
            "extensions": {"position": 0, "probability": 100, "depth": 4, "role": 0},
        },
        {
            "id": 1,
            "keys": ["shadowfang", "shadowfangs"],
            "secondary_keys": ["beast", "monster"],
            "comment": "The Shadowfangs",
            "content": "The Shadowfangs are the creatures that blighted Eldoria.",
            "constant": True,
            "selective": True,
            "insertion_order": 90,
            "enabled": False,
            "position": "after_char",
            "use_regex": True,
            "extensions": {"position": 4, "depth": 4},
        },
    ],
}

V2_CARD: dict[str, Any] = {
    # SillyTavern's V1 copies at top level, for old readers.
    "name": "Seraphina",
    "description": "Seraphina is a guardian of the forest of Eldoria.",
    "personality": "caring, protective, compassionate",
    "scenario": "{{user}} wakes up in Seraphina's glade.",
    "first_mes": GREETINGS[0],
    "mes_example": '<START>\n{{user}}: Who are you?\n{{char}}: "A friend of the woods."',
    "creatorcomment": "The default SillyTavern character.",
    "avatar": "none",
    "chat": "Seraphina - 2025-09-26@15h04m33s",
    "talkativeness": "0.5",
    "fav": False,
    "tags": ["fantasy", "guardian"],
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphina",
        "description": "Seraphina is a guardian of the forest of Eldoria.",
        "personality": "caring, protective, compassionate",
        "scenario": "{{user}} wakes up in Seraphina's glade.",
        "first_mes": GREETINGS[0],
        "mes_example": '<START>\n{{user}}: Who are you?\n{{char}}: "A friend of the woods."',
        "creator_notes": "The default SillyTavern character.",
        "system_prompt": "",
        "post_history_instructions": "Stay in character as {{char}}.",
        "tags": ["fantasy", "guardian"],
        "creator": "SillyTavern",
        "character_version": "1.1",
        "alternate_greetings": [GREETINGS[1]],
        "extensions": {
            "talkativeness": "0.5",
            "fav": False,
            "world": "Eldoria",
            "depth_prompt": {"prompt": "", "depth": 4, "role": "system"},
        },
        "character_book": BOOK,
    },
    "create_date": "2025-09-26T07:04:12.006Z",
}


def v3_of(card: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """What SillyTavern writes to ccv3: the V2 object with the spec renamed."""
    v3 = copy.deepcopy(card)
    v3["spec"], v3["spec_version"] = "chara_card_v3", "3.0"
    v3["data"].update({"group_only_greetings": [], "assets": [], **changes})
    return v3


def test_v2_png_with_character_book() -> None:
    card = parse_card(png_card(text_chunk("chara", V2_CARD)), "Seraphina.png")

    assert card.spec == "v2" and card.name == "Seraphina"
    assert card.personality == "caring, protective, compassionate"
    assert card.scenario == "{{user}} wakes up in Seraphina's glade."
    assert card.first_mes == GREETINGS[0]
    assert card.alternate_greetings == [GREETINGS[1]]
    assert card.post_history_instructions == "Stay in character as {{char}}."
    assert card.creator_notes == "The default SillyTavern character."
    assert card.tags == ["fantasy", "guardian"]
    assert (card.creator, card.character_version, card.book_name) == (
        "SillyTavern",
        "1.1",
        "Eldoria",
    )
    assert card.warnings == []
    first, second = card.book
    assert first.keys == ["eldoria", "forest", "magical forest"]
    assert first.content.startswith('{{user}}: "What is Eldoria?"')
    assert (first.enabled, first.constant, first.comment, first.insertion_order) == (
        True,
        False,
        "eldoria",
        100,
    )
    assert second.keys == ["shadowfang", "shadowfangs"]
    assert second.secondary_keys == ["beast", "monster"] and second.selective
    assert (second.enabled, second.constant, second.insertion_order) == (False, True, 90)


def test_v3_png_with_both_chunks_prefers_ccv3() -> None:
    v3 = v3_of(
        V2_CARD,
        description="Seraphina guards Eldoria (V3 edition).",
        nickname="Sera",
        creation_date=1758870252,
    )
    data = png_card(text_chunk("chara", V2_CARD), text_chunk("ccv3", v3))
    card = parse_card(data, "Seraphina.png")

    assert card.spec == "v3"
    assert card.description == "Seraphina guards Eldoria (V3 edition)."
    assert card.nickname == "Sera"
    assert len(card.book) == 2 and card.warnings == []
    # The order of the chunks does not matter.
    reordered = png_card(text_chunk("ccv3", v3), text_chunk("chara", V2_CARD))
    assert parse_card(reordered).spec == "v3"
    # Keywords are matched case-insensitively, as SillyTavern does.
    assert parse_card(png_card(text_chunk("Chara", V2_CARD))).spec == "v2"


def test_broken_ccv3_falls_back_to_chara_with_a_warning() -> None:
    good = text_chunk("ccv3", v3_of(V2_CARD))
    damaged = good[:40] + bytes([good[40] ^ 0x01]) + good[41:]
    card = parse_card(png_card(text_chunk("chara", V2_CARD), damaged))

    assert card.spec == "v2" and card.name == "Seraphina"
    assert len(card.warnings) == 1
    assert "tEXt chunk 'ccv3'" in card.warnings[0] and "bad CRC" in card.warnings[0]


def test_compressed_itxt_and_ztxt_chunks() -> None:
    payload = b64_json(v3_of(V2_CARD)).encode("ascii")
    itxt = chunk(b"iTXt", b"ccv3\0\x01\x00\0\0" + zlib.compress(payload))
    assert parse_card(png_card(itxt)).spec == "v3"
    ztxt = chunk(b"zTXt", b"chara\0\x00" + zlib.compress(payload))
    assert parse_card(png_card(ztxt)).spec == "v3"  # the JSON says V3, whatever the keyword


def test_png_truncated_after_the_card_still_reads_with_a_warning() -> None:
    data = png_card(text_chunk("chara", V2_CARD))
    card = parse_card(data[:-12])  # IEND lost
    assert card.name == "Seraphina"
    assert card.warnings == [
        f"the PNG ends at byte {len(data) - 12} without an IEND chunk (truncated?)"
    ]


def test_v1_json() -> None:
    v1 = {
        "name": "Aqua",
        "description": "The goddess of water. Vain, cheerful, useless in a fight.",
        "personality": "cheerful, vain",
        "scenario": "<USER> has just arrived in Axel.",
        "first_mes": "*strikes a pose* Are you new here? Do you need help?",
        "mes_example": "<START>\n<USER>: Can you heal?\n<BOT>: Of course I can!",
        "creatorcomment": "Konosuba fan card.",
        "tags": "anime, comedy",
        "avatar": "none",
        "talkativeness": "0.5",
        "create_date": "2023-6-5 @14h 56m 50s 682ms",
    }
    card = parse_card(json.dumps(v1, indent=4).encode("utf-8"), "Aqua.json")

    assert card.spec == "v1" and card.name == "Aqua"
    assert card.scenario == "<USER> has just arrived in Axel."
    assert card.creator_notes == "Konosuba fan card."
    assert card.tags == ["anime", "comedy"]
    assert card.alternate_greetings == [] and card.book == [] and card.system_prompt == ""


def test_v2_json_as_downloaded() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(V2_CARD, indent=2, ensure_ascii=False).encode("utf-8")
    card = parse_card(data, "seraphina.json")
    assert card.spec == "v2" and card.name == "Seraphina" and len(card.book) == 2


def test_pygmalion_json_reads_as_v1() -> None:
    old = {
        "char_name": "Lucy",
        "char_persona": "A shy librarian.",
        "world_scenario": "A quiet library at closing time.",
        "char_greeting": "Oh! We're closing soon...",
        "example_dialogue": "You: Hi\nLucy: H-hello.",
    }
    card = parse_card(json.dumps(old).encode())
    assert (card.spec, card.name, card.description, card.first_mes) == (
        "v1",
        "Lucy",
        "A shy librarian.",
        "Oh! We're closing soon...",
    )


CARD_AT = len(png_image()[0])  # the card chunk's offset: right after IHDR and IDAT


def damaged_crc() -> bytes:
    good = text_chunk("chara", V2_CARD)
    return png_card(good[:-1] + bytes([good[-1] ^ 0xFF]))


def v9_card() -> dict[str, Any]:
    return {**V2_CARD, "spec": "chara_card_v9", "spec_version": "9.0"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "card.png: the file is empty"),
        (b"hello, I am not a card", "card.png: neither a PNG image nor JSON text"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "card.png: a JPEG image, not a PNG or JSON"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "card.png: a WEBP image; only PNG and JSON"),
        (b"GIF89a\x01\x00\x01\x00", "card.png: a GIF image, not a PNG or JSON"),
        (
            png_card(chunk(b"tEXt", b"Software\0GIMP 2.10")),
            "card.png: a PNG without a character card (no 'chara' or 'ccv3' text chunk)",
        ),
        (
            png_card(text_chunk("chara", V2_CARD))[:200],
            "card.png: the PNG is truncated: chunk 'tEXt' at byte",
        ),
        (damaged_crc(), "tEXt chunk 'chara' at byte"),
        (
            png_card(text_chunk("chara", "not base64 at all!!")),
            f"'chara' at byte {CARD_AT}: not valid base64",
        ),
        (
            png_card(text_chunk("chara", base64.b64encode(b"{name: 'x'").decode())),
            f"'chara' at byte {CARD_AT}: invalid JSON inside (Expecting property name",
        ),
        (
            png_card(text_chunk("chara", v9_card())),
            "unknown card spec 'chara_card_v9'; known: chara_card_v2, chara_card_v3",
        ),
        (json.dumps(v9_card()).encode(), "card.png: unknown card spec 'chara_card_v9'"),
        (
            json.dumps({**V2_CARD, "name": "", "data": {**V2_CARD["data"], "name": " "}}).encode(),
            "card.png: the card has no name",
        ),
        (json.dumps({"description": "nameless"}).encode(), "card.png: the card has no name"),
        (b'{"name": "Seraphina", "description": ', "card.png: invalid JSON: Expecting value"),
        (b'[{"name": "Seraphina"}]', "card.png: the card JSON is an array, not an object"),
        (b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}", "card.png: JSON nested too deeply"),
        (
            json.dumps({"spec": "lorebook_v3", "data": BOOK}).encode(),
            "card.png: a lorebook ('lorebook_v3'), not a character card",
        ),
        (
            json.dumps({"spec": "chara_card_v2", "spec_version": "2.0"}).encode(),
            "card.png: a chara_card_v2 card without a 'data' object",
        ),
    ],
)
def test_card_errors(data: bytes, message: str) -> None:
    with pytest.raises(CardError) as caught:
        parse_card(data, "card.png")
    assert message in str(caught.value)


def test_chat_line_nested_too_deeply_is_a_line_error() -> None:
    deep = '{"mes": ' + "[" * 5000 + "]" * 5000 + "}"
    chat = parse_chat([deep, st_line({"name": "Mira", "mes": "Hello."})])
    assert [(e.line, e.message) for e in chat.errors] == [
        (1, "not JSON that can be read: nested too deeply")
    ]
    assert [m.text for m in chat.messages] == ["Hello."]


def test_bad_crc_error_names_the_damage() -> None:
    with pytest.raises(CardError, match=r"bad CRC \(stored [0-9a-f]{8}, computed [0-9a-f]{8}\)"):
        parse_card(damaged_crc())


def test_card_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="neither a PNG"):
        parse_card(b"plain text")


def test_placeholders() -> None:
    text = "{{char}} smiles at {{user}}. <BOT> waves to <USER>; {{Char}}, <bot>, <char>. {{x}}"
    assert card_placeholders(text, "Sera", "Mara") == (
        "Sera smiles at Mara. Sera waves to Mara; Sera, Sera, Sera. {{x}}"
    )
    # Names are inserted literally, never read as regex replacement syntax.
    assert card_placeholders("{{user}}", "x", r"C:\new \1") == r"C:\new \1"
