"""The `mnemoproxy` command: configure, doctor and start, as a user runs them.

`configure` and `doctor` run in-process through `main(argv)`; `start` and interactive
`configure` run as real subprocesses (`python -m proxy ...`), answering on stdin and
serving on a real port.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from proxy.cli import FALLBACK_UPSTREAM, main
from proxy.settings import load_settings
from proxy.upstreams.discovery import LOCAL_SERVERS
from tests.fakes.upstream import FakeUpstream

REPO = Path(__file__).resolve().parent.parent
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def open_local_ports() -> list[int]:
    """The usual model-server ports that something listens on, on this machine."""
    return [port for _, port in LOCAL_SERVERS if is_listening(port)]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no MNEMOPROXY_* of the developer's (the
    autouse fixture removed them from os.environ), data under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOPROXY_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    env.update(extra)
    return env


# -- configure from flags --------------------------------------------------------------------


def test_configure_from_flags_writes_a_file_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.toml"
    argv = ["configure", "--upstream", "http://127.0.0.1:1234/v1", "--port", "9100"]
    argv += ["--key", "client-key-1", "--key", "client-key-2", "-o", str(out)]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    settings = load_settings(out)
    assert settings.server.port == 9100
    assert settings.server.host == "127.0.0.1"
    assert {n: u.base_url for n, u in settings.upstreams.items()} == {
        "upstream": "http://127.0.0.1:1234/v1"
    }
    assert [k.get_secret_value() for k in settings.auth.keys] == ["client-key-1", "client-key-2"]
    text = out.read_text(encoding="utf-8")
    assert "# Port to listen on." in text  # commented, like the repository's config.toml


def test_configure_named_upstream_with_key_and_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.toml"
    argv = ["configure", "--upstream", "lms=http://127.0.0.1:1234/v1", "--upstream-key"]
    argv += ["sk-lm", "--host", "0.0.0.0", "-o", str(out)]
    assert main(argv) == 0
    settings = load_settings(out)
    lms = settings.upstreams["lms"]
    assert lms.base_url == "http://127.0.0.1:1234/v1"
    assert lms.api_key is not None and lms.api_key.get_secret_value() == "sk-lm"
    assert settings.server.host == "0.0.0.0"
    assert "warning: it listens beyond this machine" in capsys.readouterr().out


def test_one_upstream_key_for_several_upstreams_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It went to every upstream: a cloud key reached the local server too.
    argv = ["configure", "--upstream", "http://127.0.0.1:1234/v1", "--upstream"]
    argv += ["oa=https://api.openai.com/v1", "--upstream-key", "sk-cloud"]
    assert main([*argv, "-o", str(tmp_path / "c.toml")]) == 2
    assert "exactly one --upstream" in capsys.readouterr().err
    assert not (tmp_path / "c.toml").exists()


def test_configure_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.toml"
    out.write_text("# my hand-written config\n", encoding="utf-8")
    assert main(["configure", "--port", "9100", "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "# my hand-written config\n"
    assert main(["configure", "--port", "9100", "-o", str(out), "--force"]) == 0
    assert load_settings(out).server.port == 9100


def test_configure_from_an_existing_config_keeps_its_settings(tmp_path: Path) -> None:
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    assert main(["configure", "--upstream", "http://127.0.0.1:8080/v1", "-o", str(first)]) == 0
    assert main(["configure", "--config", str(first), "--port", "9200", "-o", str(second)]) == 0
    settings = load_settings(second)
    assert settings.upstreams["upstream"].base_url == "http://127.0.0.1:8080/v1"
    assert settings.server.port == 9200


def test_configure_with_a_bad_url_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.toml"
    assert main(["configure", "--upstream", "localhost:1234", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnemoproxy: ") and "http://" in err and "Traceback" not in err
    assert not out.exists()


def test_configure_with_a_blank_key_fails_instead_of_writing_an_open_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--key "$UNSET"`: the proxy would have looked keyed and been open to anyone.
    out = tmp_path / "c.toml"
    assert main(["configure", "--key", " ", "--host", "0.0.0.0", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "empty or blank" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "word"), [(["--host", "bad host!"], "host"), (["--port", "0"], "port")]
)
def test_configure_with_an_address_it_cannot_listen_on_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], word: str
) -> None:
    out = tmp_path / "c.toml"
    assert main(["configure", *flags, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("host", ["[::1]", "fe80::1%eth0", "my_container", "proxy.lan"])
def test_configure_takes_any_address_or_host_name(tmp_path: Path, host: str) -> None:
    out = tmp_path / "c.toml"
    assert main(["configure", "--host", host, "-o", str(out)]) == 0
    assert load_settings(out).server.host == host.strip("[]")


def test_configure_upstream_name_with_a_dot_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "c.toml"
    assert (
        main(["configure", "--upstream", "lm.studio=http://127.0.0.1:1234/v1", "-o", str(out)]) == 0
    )
    assert load_settings(out).upstreams["lm.studio"].base_url == "http://127.0.0.1:1234/v1"


# -- configure, interactive ----------------------------------------------------------------


def run_interactive(tmp_path: Path, out: Path, answers: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "configure", "-i", "-o", str(out)],
        input=answers,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cli_env(tmp_path),
        timeout=60,
    )


def test_interactive_configure_takes_the_answers(tmp_path: Path) -> None:
    out = tmp_path / "config.toml"
    answers = "http://127.0.0.1:1234/v1\nsk-lmstudio\n0.0.0.0\n9100\nclient-key\n"
    done = run_interactive(tmp_path, out, answers)
    assert done.returncode == 0, done.stderr
    for prompt in ("upstream base URL", "API key", "listen address", "port", "access key"):
        assert prompt in done.stdout
    settings = load_settings(out)
    main_upstream = settings.upstreams["main"]
    assert main_upstream.base_url == "http://127.0.0.1:1234/v1"
    assert main_upstream.api_key is not None
    assert main_upstream.api_key.get_secret_value() == "sk-lmstudio"
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9100)
    assert [k.get_secret_value() for k in settings.auth.keys] == ["client-key"]


def test_interactive_configure_enter_keeps_the_suggestions(tmp_path: Path) -> None:
    out = tmp_path / "config.toml"
    done = run_interactive(tmp_path, out, "\n" * 5)
    assert done.returncode == 0, done.stderr
    suggested = re.search(r"upstream base URL \[(\S+)\]", done.stdout)
    assert suggested is not None
    if not open_local_ports():  # nothing found: Ollama's default URL is suggested
        assert suggested.group(1) == FALLBACK_UPSTREAM
    settings = load_settings(out)
    assert settings.upstreams["main"].base_url == suggested.group(1)
    assert settings.upstreams["main"].api_key is None
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8765)
    assert settings.auth.keys == []


def test_interactive_configure_bad_port_answer_gets_a_message(tmp_path: Path) -> None:
    out = tmp_path / "config.toml"
    done = run_interactive(tmp_path, out, "http://127.0.0.1:1234/v1\n\n\nabc\n\n")
    assert "Traceback" not in done.stderr
    assert "port" in done.stderr


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_reports_reachable_models_and_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = ["qwen2.5-7b-instruct", "phi-3-mini"]
    with FakeUpstream("llamacpp", context_window=8192, models=models) as up:
        url = up.base_url
        assert main(["doctor", "--upstream", f"llama={url}"]) == 0
    out = capsys.readouterr().out
    assert f"upstream llama: ok at {url}" in out
    assert "qwen2.5-7b-instruct, phi-3-mini" in out
    assert "qwen2.5-7b-instruct: context 8192 tokens (llama.cpp /props n_ctx)" in out
    assert "131072" not in out  # the training context of /v1/models is not the window


@pytest.mark.parametrize(
    ("flavor", "expected"),
    [
        ("ollama", "context 4096 tokens (Ollama default context"),
        ("lmstudio", "context 32768 tokens (LM Studio /api/v0/models max_context_length)"),
        ("openai", "the server does not tell its context size"),
    ],
)
def test_doctor_context_of_each_kind_of_server(
    capsys: pytest.CaptureFixture[str], flavor: str, expected: str
) -> None:
    with FakeUpstream(flavor, context_window=32768) as up:
        assert main(["doctor", "--upstream", up.base_url]) == 0
    assert expected in capsys.readouterr().out


def test_doctor_prefers_the_configured_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeUpstream("llamacpp", context_window=8192) as up:
        config = tmp_path / "c.toml"
        config.write_text(
            f'[upstreams.local]\nbase_url = "{up.base_url}"\ncontext_window = 4000\n',
            encoding="utf-8",
        )
        assert main(["doctor", "--config", str(config)]) == 0
    assert "fake-model: context 4000 tokens (from config)" in capsys.readouterr().out


def test_doctor_exits_1_for_an_unreachable_upstream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeUpstream("llamacpp") as up:
        live = up.base_url
        assert main(["doctor", "--upstream", f"dead={dead}", "--upstream", f"live={live}"]) == 1
    out = capsys.readouterr().out
    assert f"upstream dead: NOT reachable at {dead}" in out
    assert f"upstream live: ok at {live}" in out
    assert main(["doctor", "--upstream", dead]) == 1


def test_doctor_with_a_bad_config_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[server]\nport = 70000\n", encoding="utf-8")
    assert main(["doctor", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnemoproxy: ") and str(config) in err and "server.port" in err


def test_doctor_with_nothing_configured_or_listening(capsys: pytest.CaptureFixture[str]) -> None:
    if open_local_ports():
        pytest.skip(f"a local model server listens on port(s) {open_local_ports()} here")
    assert main(["doctor"]) == 1
    assert "none found" in capsys.readouterr().out


# -- start -----------------------------------------------------------------------------------


@dataclass
class Started:
    """A `mnemoproxy start` subprocess and everything it printed so far."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Until the proxy accepts connections (or the process died)."""
        deadline = time.monotonic() + timeout
        while not is_listening(self.port):
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader thread drain the pipe
                pytest.fail(f"mnemoproxy start exited {self.process.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"mnemoproxy start did not listen within {timeout} s:\n{self.output}")
            time.sleep(0.05)


@contextlib.contextmanager
def start_proxy(tmp_path: Path, *args: str, **env: str) -> Iterator[Started]:
    """Run `python -m proxy start --port <free> *args`; stop it at the end, always."""
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "start", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=cli_env(tmp_path, **env),
    ) as process:
        started = Started(process, port)
        stdout = process.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                started.lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield started
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
            reader.join(timeout=5)


def test_start_reports_the_upstream_and_serves_the_openai_client(tmp_path: Path) -> None:
    with (
        FakeUpstream("llamacpp", models=["fake-model"]) as up,
        start_proxy(
            tmp_path,
            "--upstream",
            up.base_url,
            MNEMOPROXY_MEMORY__ENABLED="false",
        ) as proxy,
    ):
        proxy.wait_listening()
        with openai.OpenAI(base_url=proxy.base_url, api_key="undefined", max_retries=0) as client:
            reply = client.chat.completions.create(**CHAT)
            streamed = list(client.chat.completions.create(**CHAT, stream=True))
            assert [m.id for m in client.models.list()] == ["fake-model"]
        assert reply.choices[0].message.content == "Hello from the fake upstream."
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == "Hello from the fake upstream."
        assert up.last["messages"] == CHAT["messages"]
        # Read while it still runs, its stdout a pipe (as under docker or systemd).
        output = proxy.output
        upstream_url = up.base_url
    assert f"upstream upstream: ok at {upstream_url}; models: fake-model" in output
    assert f"mnemoproxy listening on {proxy.base_url}" in output
    assert "Traceback" not in output


def test_start_with_no_config_and_nothing_listening_still_starts(tmp_path: Path) -> None:
    """No config file, no MNEMOPROXY_* settings: it looks on the usual ports, says it
    found none, falls back to Ollama's default URL and serves anyway (memory off and a
    free port, so the test needs no embedding model and leaves port 8765 alone)."""
    busy = open_local_ports()
    with start_proxy(tmp_path, MNEMOPROXY_MEMORY__ENABLED="false", PYTHONUNBUFFERED="1") as proxy:
        proxy.wait_listening()
        assert httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json() == {"status": "ok"}
        chat = httpx.post(f"{proxy.base_url}/chat/completions", json=CHAT, timeout=30)
        output = proxy.output
    assert "no upstream configured; looking for a local model server" in output
    assert "11434, 1234, 8080, 5000" in output
    assert f"mnemoproxy listening on {proxy.base_url}" in output
    if busy:
        pytest.skip(f"a local model server listens on port(s) {busy} here: it was found")
    assert f"none found; using {FALLBACK_UPSTREAM}" in output
    assert f"upstream local: NOT reachable at {FALLBACK_UPSTREAM}" in output
    assert chat.status_code == 502
    assert "11434" in chat.json()["error"]["message"]  # the user learns where it looked


def test_start_says_in_one_line_that_its_port_is_taken_or_its_store_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt = tmp_path / "memory.db"
    corrupt.write_bytes(b"not a database, just some bytes" * 100)
    monkeypatch.setenv("MNEMOPROXY_MEMORY__DATABASE", str(corrupt))
    nowhere = "http://127.0.0.1:9/v1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["start", "--upstream", nowhere, "--port", port]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["start", "--upstream", nowhere, "--port", port]) == 1
    out, err = capsys.readouterr()
    assert "listening on" not in out and "Traceback" not in err
    assert err.startswith("mnemoproxy: the memory store") and "restore it" in err
    assert corrupt.read_bytes().startswith(b"not a database")  # never replaced
