"""Importing SillyTavern chats: a 5,000-message file through the CLI, recalled on the
chat path; a file the API takes, the CLI takes too; bad lines reported by number while
the rest is imported; imports into a scope with messages refused unless appended; and a
chat that SillyTavern continues after its import lines up with it (the import used the
live write path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.cli import main
from proxy.settings import Settings
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import GREETING, memory_block, st_messages

START = 1_700_000_000.0  # 2023-11-14: every message of the file is dated from here
EVENT = "At the harvest festival the old bard Quillan gave Tom a silver fiddle."


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


def st_line(i: int, text: str, *, user: bool) -> str:
    return json.dumps(
        {
            "name": "Tom" if user else "Mira",
            "is_user": user,
            "is_system": False,
            "send_date": int((START + 60 * i) * 1000),  # epoch milliseconds, as ST writes
            "mes": text,
            "extra": {},
        }
    )


def st_chat(texts: list[str]) -> str:
    """A SillyTavern chat file: the header, the greeting, then turns in `texts`."""
    header = {
        "user_name": "Tom",
        "character_name": "Mira",
        "create_date": "2023-11-14@22h13m20s",
        "chat_metadata": {},
    }
    lines = [json.dumps(header), st_line(0, GREETING, user=False)]
    lines += [st_line(i, text, user=i % 2 == 1) for i, text in enumerate(texts, start=1)]
    return "\n".join(lines)


def chatter(i: int) -> str:
    return f"Day {i}: the caravan rolls past field {i % 97} and river {i % 31}."


def api(proxy: RunningServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{proxy.url}/memory{path}", timeout=60, **kwargs)


def test_cli_imports_a_5000_message_chat_and_recall_finds_an_early_event(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Unrelated texts get nearly orthogonal fake vectors in 384 dimensions, as with a
    # real model (in 16, the best of 5,000 random neighbours looks very similar).
    up.embedding_dim = 384
    proxy = memory_proxy(make_proxy, up, tmp_path)
    texts = [chatter(i) for i in range(1, 5000)]
    texts[6] = EVENT  # an early event: message 8 of the file
    chat_file = tmp_path / "Mira - 2023-11-14@22h13m20s.jsonl"
    chat_file.write_text(st_chat(texts), encoding="utf-8")

    assert main(["import-chat", "epic", str(chat_file), "--url", proxy.url]) == 0
    out, err = capsys.readouterr()
    assert "imported 5000 messages into epic" in out
    assert "importing Mira - 2023-11-14@22h13m20s.jsonl" in err

    scope = api(proxy, "GET", "/scopes/epic").json()
    assert scope["messages"]["active"] == 5000 and scope["threads"] == 1
    assert scope["label"] == "Mira"

    # Ask about it, as SillyTavern would in a new chat, without writing anything.
    up.enqueue(Reply(text="Quillan, at the harvest festival."))
    question = "Who gave Tom the silver fiddle at the harvest festival?"
    body = {
        "model": "fake-model",
        "messages": [*st_messages([]), {"role": "user", "content": question}],
    }
    response = httpx.post(
        f"{proxy.url}/s/epic/v1/chat/completions",
        json=body,
        headers={"X-Memory-Write": "off"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert EVENT in (memory_block(up.last["messages"]) or "")
    logged = api(proxy, "GET", f"/requests/{response.headers['x-memory-request-id']}").json()
    (item,) = [i for i in logged["detail"]["injected"] if i["text"] == EVENT]
    (source,) = item["source_ids"]
    transcript = api(proxy, "GET", "/scopes/epic/transcript", params={"limit": 10}).json()
    event = next(m for m in transcript["messages"] if m["id"] == source)
    assert event["content"] == EVENT and event["speaker"] == "Tom"
    assert event["seen_at"] == pytest.approx(START + 60 * 7)  # the date of the file, kept
    # Write off: nothing remembered (the exchange is kept as private messages, no text).
    assert api(proxy, "GET", "/scopes/epic").json()["memories"] == scope["memories"]


def test_http_import_reports_bad_lines_imports_the_rest_and_refuses_a_second_chat_unless_appended(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    lines = st_chat(["Hello, Mira.", "Well met, Tom.", "Shall we ride?", "Aye."]).split("\n")
    lines.insert(3, '{"name": "Tom", "is_user": tru')  # cut short
    lines.insert(5, "[1, 2, 3]")
    content = "\n".join(lines).encode()
    result = api(proxy, "POST", "/scopes/st/import/sillytavern", content=content).json()
    assert result["messages"] == 5 and result["thread"] == 1
    assert [e["line"] for e in result["errors"]] == [4, 6]
    assert "not JSON" in result["errors"][0]["message"]
    assert result["character_name"] == "Mira" and result["user_name"] == "Tom"
    transcript = api(proxy, "GET", "/scopes/st/transcript").json()["messages"]
    assert [(m["speaker"], m["role"]) for m in transcript] == [
        ("Mira", "assistant"),
        ("Tom", "user"),
        ("Mira", "assistant"),
        ("Tom", "user"),
        ("Mira", "assistant"),
    ]
    assert [m["seen_at"] for m in transcript] == [START + 60 * i for i in range(5)]
    style = api(proxy, "GET", "/scopes/st/style").json()["style"]
    assert style["text"] == GREETING and style["source"] == "auto"
    memories = api(proxy, "GET", "/scopes/st/memories", params={"kind": "turn"}).json()
    assert len(memories["memories"]) == 5

    refused = api(proxy, "POST", "/scopes/st/import/sillytavern", content=content)
    assert refused.status_code == 409 and "append" in refused.json()["error"]["message"]
    again = api(
        proxy, "POST", "/scopes/st/import/sillytavern", params={"append": "true"}, content=content
    )
    assert again.status_code == 200 and again.json()["thread"] == 2
    assert api(proxy, "GET", "/scopes/st").json()["threads"] == 2

    nothing = api(proxy, "POST", "/scopes/st2/import/sillytavern", content=b"{oops\nnope\n")
    assert nothing.status_code == 400
    assert "line 1" in nothing.json()["error"]["message"]
    assert api(proxy, "GET", "/scopes/st2").status_code == 404  # nothing created


def test_a_chat_continued_after_its_import_lines_up_with_it(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    history = [
        ("user", "Hello, Mira."),
        ("assistant", "Well met, Tom."),
        ("user", "Shall we ride?"),
        ("assistant", "Aye."),
    ]
    content = st_chat([text for _, text in history]).encode()
    assert api(proxy, "POST", "/scopes/go/import/sillytavern", content=content).status_code == 200
    before = api(proxy, "GET", "/scopes/go/transcript").json()["messages"]
    # SillyTavern sends the whole chat again with the next message.
    up.enqueue(Reply(text="To the coast, then."))
    body = {"model": "fake-model", "messages": st_messages([*history, ("user", "To the coast?")])}
    response = httpx.post(f"{proxy.url}/s/go/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    after = api(proxy, "GET", "/scopes/go/transcript").json()["messages"]
    assert after[: len(before)] == before  # nothing undone, nothing stored twice
    new = [(m["role"], m["content"], m["thread"]) for m in after[len(before) :]]
    assert ("user", "To the coast?", 1) in new and ("assistant", "To the coast, then.", 1) in new
    assert all(m["content"] not in dict(history).values() for m in after[len(before) :])


def test_cli_import_chat_in_direct_mode_names_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = st_chat(["Hello.", "Hi."]).split("\n")
    lines.insert(2, "garbage")
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text("\n".join(lines), encoding="utf-8")
    db = str(tmp_path / "direct.db")
    assert main(["import-chat", "solo", str(chat_file), "--db", db]) == 0
    out, err = capsys.readouterr()
    assert "imported 3 messages into solo" in out
    assert "line 3: not JSON" in out and "the rest was imported" in out
    assert "importing chat.jsonl" in err
    assert main(["import-chat", "solo", str(chat_file), "--db", db]) == 1
    assert "append" in capsys.readouterr().err
    assert main(["import-chat", "solo", str(chat_file), "--db", db, "--append", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["thread"] == 2 and report["messages"] == 3
    assert [e["line"] for e in report["errors"]] == [3]


def test_the_cli_imports_whatever_chat_the_api_does_in_one_piece(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    texts = [chatter(i) for i in range(1, 300)]
    texts[279] = "A very long letter. " * 12_500  # 250,000 characters, line 282 of the file
    chat_file = tmp_path / "long.jsonl"
    chat_file.write_text(st_chat(texts), encoding="utf-8")
    content = chat_file.read_bytes()
    by_api = api(proxy, "POST", "/scopes/by-api/import/sillytavern", content=content)
    assert by_api.status_code == 200 and by_api.json()["messages"] == 300

    assert main(["import-chat", "by-cli", str(chat_file), "--url", proxy.url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {**by_api.json(), "thread": report["thread"]}
    stored = api(proxy, "GET", "/scopes/by-cli/transcript", params={"limit": 500}).json()
    assert [m["content"] for m in stored["messages"]][1:] == texts
    assert api(proxy, "GET", "/scopes/by-cli").json()["label"] == "Mira"

    # A file with nothing readable: refused whole, naming its lines; no scope is left.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "Tom", "is_user": tru\n[1, 2]\n', encoding="utf-8")
    assert main(["import-chat", "nothing", str(bad), "--url", proxy.url]) == 1
    err = capsys.readouterr().err
    assert "line 1: not JSON" in err and "(400)" in err
    assert api(proxy, "GET", "/scopes/nothing").status_code == 404


def test_transcript_append_takes_dates_as_unix_seconds_or_iso_8601(
    up: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    messages = [
        {"role": "user", "content": "Hello.", "date": "2024-05-01T12:00:00Z"},
        {"role": "assistant", "content": "Well met.", "date": 1714564860},
    ]
    result = api(proxy, "POST", "/scopes/dated/transcript", json={"messages": messages})
    assert result.status_code == 200, result.text
    stored = api(proxy, "GET", "/scopes/dated/transcript").json()["messages"]
    assert [m["seen_at"] for m in stored] == [1714564800.0, 1714564860.0]
    bad = [{"role": "user", "content": "Hi.", "date": "yesterday"}]
    refused = api(proxy, "POST", "/scopes/dated/transcript", json={"messages": bad, "append": True})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages.0.date"
