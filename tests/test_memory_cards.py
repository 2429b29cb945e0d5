"""Importing character cards over HTTP: PNG (V2 `chara`, V3 `ccv3`) and JSON become the
scene, the style sample and notes, which the chat path then injects; broken PNGs and
unknown specs get a clear 400; a scope with messages needs append."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.settings import Settings
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import memory_block

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CARD_V2: dict[str, Any] = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Mira",
        "description": "{{char}} is a cartographer who maps the Riverlands for {{user}}.",
        "personality": "dry wit",
        "scenario": "A tavern in Dunmore, late at night.",
        "first_mes": "*{{char}} looks up from her map.* Well met, {{user}}.",
        "mes_example": "<START>\n{{user}}: Any news?\n{{char}}: *taps the map* The bridge is out.",
        "alternate_greetings": ["Another greeting."],
        "character_book": {
            "entries": [
                {
                    "keys": ["Dunmore"],
                    "content": "Dunmore is a river town with a broken bridge.",
                    "enabled": True,
                    "insertion_order": 1,
                },
                {
                    "keys": ["oath"],
                    "content": "{{char}} swore never to lie to {{user}}.",
                    "enabled": True,
                    "constant": True,
                    "insertion_order": 2,
                },
                {"keys": ["x"], "content": "A disabled entry.", "enabled": False},
            ]
        },
    },
}


def chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png(*text_chunks: bytes) -> bytes:
    """A 1x1 PNG with the given extra chunks before IEND (where SillyTavern puts cards)."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
    return PNG_SIGNATURE + header + pixels + b"".join(text_chunks) + chunk(b"IEND", b"")


def card_chunk(card: dict[str, Any], keyword: bytes = b"chara") -> bytes:
    return chunk(b"tEXt", keyword + b"\x00" + base64.b64encode(json.dumps(card).encode()))


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def memory_proxy(make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path) -> RunningServer:
    sections: dict[str, Any] = {
        "embeddings": {"backend": "upstream", "upstream": "local", "model": "fake-model"}
    }
    if "background" in Settings.model_fields:  # no LLM jobs: they would take the replies
        sections["background"] = {"llm": False}
    memory = {"enabled": True, "database": str(tmp_path / "memory.db")}
    return make_proxy({"local": up}, memory=memory, **sections)


def api(proxy: RunningServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{proxy.url}/memory{path}", timeout=30, **kwargs)


def import_card(proxy: RunningServer, scope: str, data: bytes, **params: Any) -> httpx.Response:
    return api(proxy, "POST", f"/scopes/{scope}/import/card", content=data, params=params)


def test_a_png_card_becomes_scene_style_sample_and_notes_that_the_chat_uses(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    response = import_card(proxy, "mira", png(card_chunk(CARD_V2)), filename="Mira.png")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["name"] == "Mira" and result["spec"] == "v2"
    assert result["style_sample"] and result["notes"] == 2 and result["pinned_notes"] == 1

    scene = api(proxy, "GET", "/scopes/mira/scene").json()
    assert scene == {
        "character": "Mira is a cartographer who maps the Riverlands for User.\n"
        "Mira's personality: dry wit",
        "location": "A tavern in Dunmore, late at night.",
        "char_name": "Mira",
    }
    style = api(proxy, "GET", "/scopes/mira/style").json()["style"]
    assert style["source"] == "manual"
    assert style["text"] == (
        "*Mira looks up from her map.* Well met, User.\n\n"
        "User: Any news?\nMira: *taps the map* The bridge is out."
    )
    notes = api(proxy, "GET", "/scopes/mira/memories", params={"kind": "note"}).json()
    by_text = {n["text"]: n for n in notes["memories"]}
    assert set(by_text) == {
        "Dunmore is a river town with a broken bridge.",
        "Mira swore never to lie to User.",
    }
    assert by_text["Mira swore never to lie to User."]["pinned"]
    assert by_text["Dunmore is a river town with a broken bridge."]["meta"]["keys"] == ["Dunmore"]
    assert api(proxy, "GET", "/scopes/mira").json()["label"] == "Mira"

    up.enqueue(Reply(text="Aye."))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there."}]}
    chat = httpx.post(f"{proxy.url}/s/mira/v1/chat/completions", json=body, timeout=30)
    assert chat.status_code == 200
    block = memory_block(up.last["messages"]) or ""
    assert "Where: A tavern in Dunmore, late at night." in block
    assert "Mira swore never to lie to User." in block  # the constant entry, pinned
    assert "How Mira speaks" in block and "The bridge is out." in block

    # A scope with messages takes a card only when asked to.
    refused = import_card(proxy, "mira", png(card_chunk(CARD_V2)))
    assert refused.status_code == 409 and "append" in refused.json()["error"]["message"]
    assert import_card(proxy, "mira", png(card_chunk(CARD_V2)), append="true").status_code == 200


def test_v3_and_json_cards_use_the_nickname_and_the_users_name(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    v3 = {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {**CARD_V2["data"], "nickname": "Mimi", "character_book": None},
    }
    api(proxy, "POST", "/scopes", json={"name": "v3"})
    api(proxy, "PUT", "/scopes/v3/scene", json={"user_name": "Tom"})
    # Both chunks, as SillyTavern writes them: ccv3 wins.
    data = png(card_chunk(CARD_V2), card_chunk(v3, b"ccv3"))
    result = import_card(proxy, "v3", data).json()
    assert result["spec"] == "v3" and result["notes"] == 0
    scene = api(proxy, "GET", "/scopes/v3/scene").json()
    assert scene["char_name"] == "Mimi" and scene["user_name"] == "Tom"
    assert scene["character"].startswith("Mimi is a cartographer who maps the Riverlands for Tom.")
    as_json = import_card(proxy, "plain", json.dumps(CARD_V2).encode(), filename="mira.json")
    assert as_json.status_code == 200 and as_json.json()["notes"] == 2


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"GIF89a....", "GIF"),
        (b"plain words", "neither a PNG"),
        (b"{not json", "invalid JSON"),
        (
            json.dumps({"spec": "chara_card_v9", "data": {"name": "X"}}).encode(),
            "unknown card spec",
        ),
        (png(), "no"),
        (png(card_chunk(CARD_V2))[:-40], ""),  # cut off inside the card chunk
        (
            png(card_chunk({"spec": "chara_card_v9", "data": {"name": "X"}})),
            "chara_card_v9",
        ),
    ],
)
def test_unusable_cards_get_a_clear_400(
    data: bytes, words: str, up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    response = import_card(proxy, "bad", data, filename="card.png")
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("not a usable character card") and words in message
    assert api(proxy, "GET", "/scopes/bad").status_code == 404  # nothing created


def test_a_png_with_a_broken_chunk_crc_is_refused_unless_another_chunk_has_the_card(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    good = card_chunk(CARD_V2)
    broken = good[:-4] + bytes(4)  # wrong CRC
    response = import_card(proxy, "crc", png(broken))
    assert response.status_code == 400
    assert "CRC" in response.json()["error"]["message"]
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": CARD_V2["data"]}
    fallback = import_card(proxy, "crc", png(good, chunk(b"tEXt", b"ccv3\x00!!!")))
    assert fallback.status_code == 200, fallback.text
    assert fallback.json()["warnings"]  # says which chunk was broken
    assert import_card(proxy, "crc2", png(card_chunk(v3, b"ccv3"))).status_code == 200


def test_a_card_imported_again_replaces_its_notes_instead_of_adding_them_twice(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)

    def notes() -> list[str]:
        listed = api(proxy, "GET", "/scopes/mira/memories", params={"kind": "note"}).json()
        return sorted(n["text"] for n in listed["memories"])

    assert import_card(proxy, "mira", json.dumps(CARD_V2).encode()).json()["notes"] == 2
    before = notes()
    again = import_card(proxy, "mira", json.dumps(CARD_V2).encode()).json()
    assert (again["notes"], again["notes_retracted"]) == (0, 0)
    assert notes() == before

    # Edited: one entry rewritten, so the old one goes and the new one comes.
    edited = json.loads(json.dumps(CARD_V2))
    edited["data"]["character_book"]["entries"][0]["content"] = "Dunmore's bridge is mended."
    result = import_card(proxy, "mira", json.dumps(edited).encode()).json()
    assert (result["notes"], result["notes_retracted"]) == (1, 1)
    assert notes() == ["Dunmore's bridge is mended.", "Mira swore never to lie to User."]
