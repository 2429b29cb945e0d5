"""The memory commands of `mnemoproxy`, run in-process through `main(argv)`: against a
running proxy (with its key), and directly on the database file (`--db`, or when no
proxy answers). Output for people by default, the API's JSON with --json."""

from __future__ import annotations

import json
import socket
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
from tests.memory_helpers import GREETING, st_body

FACT = "My sister Ana keeps a lighthouse on Vessel Rock."
KEY = "key-tom"


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def memory_proxy(
    make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path, **sections: Any
) -> RunningServer:
    sections.setdefault(
        "embeddings", {"backend": "upstream", "upstream": "local", "model": "fake-model"}
    )
    if "background" in Settings.model_fields:  # no LLM jobs: they would take the replies
        sections.setdefault("background", {"llm": False})
    memory = {"enabled": True, "database": str(tmp_path / "memory.db")}
    return make_proxy({"local": up}, memory=memory, **sections)


class Cli:
    """Runs `mnemoproxy ...` in-process and keeps what it printed."""

    def __init__(self, capsys: pytest.CaptureFixture[str], common: list[str]) -> None:
        self.capsys = capsys
        self.common = common
        self.out = self.err = ""

    def __call__(self, *argv: str, status: int = 0) -> str:
        code = main([*argv, *self.common])
        self.out, self.err = self.capsys.readouterr()
        assert code == status, (argv, self.out, self.err)
        return self.out

    def json(self, *argv: str) -> Any:
        return json.loads(self(*argv, "--json"))


def test_every_memory_command_against_a_running_proxy(
    up: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path, auth={"keys": [KEY]})
    auth = {"Authorization": f"Bearer {KEY}"}
    request_ids = []
    history: list[tuple[str, str]] = []
    for text in ("Hello, Mira.", FACT):
        history.append(("user", text))
        up.enqueue(Reply(text="Mira nods."))
        response = httpx.post(
            f"{proxy.url}/s/camp/v1/chat/completions", json=st_body(history), headers=auth
        )
        request_ids.append(response.headers["x-memory-request-id"])
        history.append(("assistant", "Mira nods."))

    cli = Cli(capsys, ["--url", proxy.url])
    cli("scopes", status=1)
    assert "missing API key" in cli.err
    monkeypatch.setenv("MNEMOPROXY_KEY", KEY)
    out = cli("scopes")
    assert "camp" in out and "Mira" in out
    shown = cli.json("scopes", "show", "camp")
    api = httpx.get(f"{proxy.url}/memory/scopes/camp", headers=auth).json()
    assert shown == {**api, "jobs": shown["jobs"]}
    assert "messages  5 active" in cli("scopes", "show", "camp")

    # memories
    note = cli.json("memories", "add", "camp", "Ana fears boats.", "--pin")
    assert note["pinned"] and note["kind"] == "note"
    notes = cli.json("memories", "list", "camp", "--kind", "note")["memories"]
    assert [n["id"] for n in notes] == [note["id"]]
    assert FACT in cli("memories", "search", "camp", "lighthouse Ana")
    edited = cli.json("memories", "edit", "camp", str(note["id"]), "--text", "Ana fears ships.")
    assert edited["text"] == "Ana fears ships."
    assert not cli.json("memories", "pin", "camp", str(note["id"]), "--off")["pinned"]
    assert "deleted memory" in cli("memories", "rm", "camp", str(note["id"]))
    cli("memories", "rm", "camp", str(note["id"]), status=1)
    assert "no memory" in cli.err

    # summary, style, scene
    cli("summary", "camp", "--set", "Tom told Mira about his sister.")
    assert "Tom told Mira about his sister." in cli("summary", "camp")
    cli("summary", "camp", "--clear")
    assert "summary cleared" in cli("summary", "camp", "--clear")  # none left: no error
    assert "no summary" in cli("summary", "camp")
    assert "retracted" in cli("summary", "camp", "--history")
    assert GREETING in cli("style", "camp")
    text_file = tmp_path / "style.txt"
    text_file.write_text("*Mira grins.* Aye.", encoding="utf-8")
    cli("style", "camp", "--set-file", str(text_file))
    assert cli.json("style", "camp")["style"]["text"] == "*Mira grins.* Aye."
    assert GREETING in cli("style", "camp", "--history")
    assert "location   the docks" in cli("scene", "camp", "--location", "the docks")
    assert cli.json("scene", "camp", "--location", "") == {}
    cli("scene", "camp", "--location", "the docks", "--user", "a sailor")
    replaced = cli.json("scene", "camp", "--clear", "--character", "a cartographer")
    assert replaced == {"character": "a cartographer"}  # not ignored, nor merged

    # request log and transcript
    listed = cli("requests", "camp")
    assert all(rid in listed for rid in request_ids)
    detail = cli("requests", "--id", request_ids[-1])
    assert "tokens" in detail and "scope camp" in detail
    # A request that showed a pinned note (which has no score) is shown too.
    pinned = cli.json("memories", "add", "camp", "Ana fears boats.", "--pin")
    history.append(("user", "Shall we sail?"))
    up.enqueue(Reply(text="Mira nods."))
    response = httpx.post(
        f"{proxy.url}/s/camp/v1/chat/completions", json=st_body(history), headers=auth
    )
    detail = cli("requests", "--id", response.headers["x-memory-request-id"])
    assert f"note #{pinned['id']} pinned note: Ana fears boats." in detail
    assert FACT in cli("transcript", "camp")

    # export, import, rename, settings, delete
    exported = tmp_path / "camp.json"
    cli("export", "camp", "-o", str(exported))
    assert "imported into copy" in cli("import", "copy", str(exported))
    again = cli.json("export", "copy")
    original = json.loads(exported.read_text(encoding="utf-8"))
    assert {**again, "scope": None} == {**original, "scope": None}
    cli("import", "copy", str(exported), status=1)
    assert "append" in cli.err
    assert "scope     copy2" in cli("scopes", "rename", "copy", "copy2")
    assert cli.json("scopes", "rename", "copy2", "--label", "Ship")["label"] == "Ship"
    assert cli.json("scopes", "rename", "copy2", "--label", "")["label"] is None
    assert "memory off" in cli("scopes", "set", "copy2", "--memory", "off")
    cli("scopes", "rm", "copy2", status=1)  # no terminal to ask, no --yes
    assert "not deleted" in cli.err
    cli("scopes", "rm", "copy2", "--yes")
    assert "copy2" not in cli("scopes")

    card = tmp_path / "mira.json"
    card.write_text(json.dumps({"name": "Mira", "scenario": "A tavern."}), encoding="utf-8")
    assert "imported card Mira" in cli("import-card", "tavern", str(card))
    assert cli.json("scene", "tavern")["location"] == "A tavern."


def test_direct_mode_on_the_database_file_and_the_fallback_when_no_proxy_answers(
    up: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = memory_proxy(make_proxy, up, tmp_path)
    up.enqueue(Reply(text="Mira nods."))
    httpx.post(f"{proxy.url}/s/camp/v1/chat/completions", json=st_body([("user", FACT)]))
    db = str(tmp_path / "memory.db")

    cli = Cli(capsys, ["--db", db])
    assert "camp" in cli("scopes")
    found = cli("memories", "search", "camp", "lighthouse")
    assert "keyword search only" in found and FACT in found
    cli.json("memories", "add", "camp", "Written without the proxy.", "--pin")
    # The running proxy sees what was written directly (it reads the same file).
    notes = httpx.get(f"{proxy.url}/memory/scopes/camp/memories", params={"kind": "note"}).json()
    assert [n["text"] for n in notes["memories"]] == ["Written without the proxy."]

    # No proxy at the configured address: the commands open the file instead.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {port}\n\n[memory]\ndatabase = "{db}"\n', encoding="utf-8")
    fallback = Cli(capsys, ["--config", str(config)])
    assert "camp" in fallback("scopes")
    assert "no proxy answers; using the database" in fallback.err
    # An explicit --url that does not answer is an error, not a silent switch.
    explicit = Cli(capsys, ["--url", f"http://127.0.0.1:{port}"])
    explicit("scopes", status=1)
    assert "no proxy answers" in explicit.err
    missing = Cli(capsys, ["--db", str(tmp_path / "none.db")])
    missing("scopes", status=1)
    assert "no memory database" in missing.err
