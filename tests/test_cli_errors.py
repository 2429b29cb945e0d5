"""Bad input to `mnemoproxy` ends in one line on stderr and an exit status, never a
traceback: invalid scope names, unusable output paths, a closed stdout (`| head`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy.cli import main
from proxy.cli_memory import Api, CliError
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream
from tests.test_cli import free_port
from tests.test_memory_cli import memory_proxy as cli_proxy

REPO = Path(__file__).resolve().parent.parent

# Every command that takes a scope name, with '..' where the name goes.
SCOPE_COMMANDS = [
    ["scopes", "show", ".."],
    ["scopes", "create", ".."],
    ["scopes", "rename", "camp", ".."],
    ["scopes", "rename", "..", "camp"],
    ["scopes", "set", "..", "--memory", "off"],
    ["scopes", "rm", "..", "--yes"],
    ["memories", "list", ".."],
    ["memories", "search", "..", "boats"],
    ["memories", "add", "..", "a note"],
    ["memories", "rm", "..", "1"],
    ["summary", ".."],
    ["style", "..", "--clear"],
    ["scene", ".."],
    ["requests", ".."],
    ["transcript", ".."],
    ["export", ".."],
    ["import", "..", "missing.json"],
    ["import-chat", "..", "missing.jsonl"],
    ["import-card", "..", "missing.png"],
]


def memory_proxy(make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path) -> RunningServer:
    """`test_memory_cli`'s proxy (memory on, no LLM jobs), with a scope "camp"."""
    proxy = cli_proxy(make_proxy, upstream, tmp_path)
    httpx.post(f"{proxy.url}/memory/scopes", json={"name": "camp"}).raise_for_status()
    return proxy


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 1) -> str:
    """Run the CLI, expecting `status` and one line `mnemoproxy: ...` on stderr."""
    assert main(list(argv)) == status
    err = capsys.readouterr().err
    assert err.startswith("mnemoproxy: ") and err.count("\n") == 1, err
    return err


# -- scope names ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", SCOPE_COMMANDS, ids=lambda a: " ".join(a))
def test_every_scope_command_refuses_an_invalid_name_before_connecting(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens at --url: the name is refused before any connection (or file read).
    err = one_line_error(capsys, *argv, "--url", f"http://127.0.0.1:{free_port()}")
    assert "scope name '..'" in err


@pytest.mark.parametrize("name", [".", "..", ".camp", "_x", "a/b", "a..b"])
def test_dot_names_through_the_proxy_and_directly(
    name: str,
    upstream: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # '.' and '..' were left alone by quote(): the URL collapsed to /memory/scopes/ or
    # /memory/, and the answer, some other document, ended in a KeyError or TypeError.
    proxy = memory_proxy(make_proxy, upstream, tmp_path)
    err = one_line_error(capsys, "scopes", "show", name, "--url", proxy.url)
    assert f"scope name {name!r}" in err
    err = one_line_error(capsys, "scopes", "show", name, "--db", str(tmp_path / "memory.db"))
    assert f"scope name {name!r}" in err
    assert main(["scopes", "show", "camp", "--url", proxy.url]) == 0


def test_a_request_id_that_would_collapse_the_url_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for bad in (".", ".."):
        url = f"http://127.0.0.1:{free_port()}"
        err = one_line_error(capsys, "requests", "--id", bad, "--url", url)
        assert "request id" in err


# -- options an action does not take --------------------------------------------------------

# An option or argument the action does not use, and the words that name it.
IGNORED = [
    (["memories", "add", "camp", "a note", "--pinned"], "memories add does not take --pinned"),
    (
        ["memories", "edit", "camp", "1", "--text", "y", "--pin"],
        "memories edit does not take --pin",
    ),
    (["memories", "list", "camp", "--pin"], "memories list does not take --pin"),
    (["memories", "list", "camp", "--text", "y"], "memories list does not take --text"),
    (["memories", "list", "camp", "7"], "memories list does not take the extra argument '7'"),
    (["memories", "rm", "camp", "1", "--off"], "memories rm does not take --off"),
    (["memories", "search", "camp", "boats", "--kind", "note"], "search does not take --kind"),
    (["scopes", "list", "a", "b"], "scopes list does not take the extra argument 'a'"),
    (["scopes", "show", "camp", "--label", ""], "scopes show does not take --label"),
    (["scopes", "rm", "camp", "--memory", "off"], "scopes rm does not take --memory"),
    (["scopes", "create", "camp", "other"], "scopes create does not take the extra argument"),
]


@pytest.mark.parametrize(("argv", "said"), IGNORED, ids=[" ".join(a) for a, _ in IGNORED])
def test_an_option_the_action_does_not_take_is_refused_before_connecting(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(capsys, *argv, "--url", f"http://127.0.0.1:{free_port()}")
    assert said in err


def test_a_refused_option_changes_nothing_and_the_hint_names_the_right_one(
    upstream: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = memory_proxy(make_proxy, upstream, tmp_path)
    err = one_line_error(
        capsys, "memories", "add", "camp", "a note", "--pinned", "--url", proxy.url
    )
    assert "(it takes --text, --pin, --importance)" in err
    err = one_line_error(capsys, "memories", "add", "camp", "a", "--text", "b", "--url", proxy.url)
    assert "the text once" in err
    assert main(["memories", "list", "camp", "--json", "--url", proxy.url]) == 0
    assert json.loads(capsys.readouterr().out)["memories"] == []
    # What the actions do take still works.
    assert main(["memories", "add", "camp", "a note", "--pin", "--url", proxy.url]) == 0
    assert main(["memories", "list", "camp", "--pinned", "--url", proxy.url]) == 0
    assert "a note" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["rm", "pin", "edit"])
def test_a_memory_command_without_its_id_gives_its_usage(
    action: str,
    upstream: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = memory_proxy(make_proxy, upstream, tmp_path)
    err = one_line_error(capsys, "memories", action, "camp", "--url", proxy.url)
    assert f"mnemoproxy: memories {action} SCOPE ID" in err and "None" not in err


# -- files ----------------------------------------------------------------------------------


def test_export_into_a_directory_writes_scope_json(
    upstream: FakeUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = memory_proxy(make_proxy, upstream, tmp_path)
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", "camp", "-o", f"{folder}/", "--url", proxy.url]) == 0
    assert str(folder / "camp.json") in capsys.readouterr().err
    assert (folder / "camp.json").read_text(encoding="utf-8").startswith("{")
    assert main(["export", "camp", "-o", str(folder), "--url", proxy.url]) == 0  # no slash
    capsys.readouterr()
    err = one_line_error(capsys, "export", "camp", "-o", f"{tmp_path}/none/", "--url", proxy.url)
    assert "no directory" in err
    missing = tmp_path / "none" / "camp.json"
    err = one_line_error(capsys, "export", "camp", "-o", str(missing), "--url", proxy.url)
    assert f"cannot write {missing}" in err


def test_configure_into_a_directory_or_a_missing_one_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(capsys, "configure", "--port", "9100", "-o", str(tmp_path), "--force")
    assert "is a directory" in err
    missing = tmp_path / "none" / "config.toml"
    err = one_line_error(capsys, "configure", "--port", "9100", "-o", str(missing))
    assert f"cannot write {missing}" in err
    there = tmp_path / "config.toml"
    there.write_text("# mine\n")
    err = one_line_error(capsys, "configure", "--port", "9100", "-o", str(there))
    assert f"{there} exists; use --force to overwrite" in err
    assert there.read_text() == "# mine\n"


def test_a_key_that_is_not_ascii_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert "ASCII" in one_line_error(capsys, "scopes", "--key", "clé", "--url", url)


def test_an_answer_that_is_not_json_is_an_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text="<html>"))

    async def call() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            await Api(client, "http://web", None, direct=False).call("GET", "/scopes")

    with pytest.raises(CliError, match="did not answer with JSON"):
        asyncio.run(call())


# -- a closed stdout ------------------------------------------------------------------------


def run_with_closed_stdout(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[bytes]:
    """`python -m proxy ARGV | true`, deterministically: the pipe's reader is gone before
    the command writes anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOPROXY_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
            timeout=60,
        )
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_quietly(
    upstream: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, upstream, tmp_path)
    for argv in (
        ["scopes", "show", "camp", "--url", proxy.url],
        ["export", "camp", "--db", str(tmp_path / "memory.db")],
    ):
        done = run_with_closed_stdout(tmp_path, *argv)
        assert (done.returncode, done.stderr.decode()) == (141, ""), argv
