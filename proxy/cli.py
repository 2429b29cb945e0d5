"""The `mnemoproxy` command: parse, call the core, print. The core never imports this."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from proxy import cli_memory
from proxy.config_file import render_config
from proxy.settings import Settings, SettingsError, load_settings
from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.discovery import (
    LOCAL_SERVERS,
    FoundServer,
    context_window,
    describe_servers,
    list_models,
    probe_local_servers,
)
from proxy.upstreams.registry import Upstream

FALLBACK_UPSTREAM = "http://127.0.0.1:11434/v1"  # Ollama's default, the most common setup


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mnemoproxy` console script."""
    try:
        try:
            return run_command(argv)
        finally:
            # Flush here, not in the interpreter's exit, so a closed pipe is caught below.
            sys.stdout.flush()
    except BrokenPipeError:  # `mnemoproxy ... | head`: the reader has all it wanted
        return stdout_closed()


def stdout_closed() -> int:
    """Stop quietly once stdout's reader has gone: exit status 141 (128 + SIGPIPE), as a
    command killed by the signal would, with stdout on /dev/null so that the buffered
    rest is not flushed into the closed pipe again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (captured in tests)
        pass
    return 141


def run_command(argv: list[str] | None) -> int:
    """Parse the command line and run the command; settings errors in one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"mnemoproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="mnemoproxy",
        description="An OpenAI-compatible proxy that gives any chat app long-term memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")

    start = sub.add_parser("start", help="start the proxy")
    _add_common(start)
    start.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    start.add_argument("--port", type=int, help="port to listen on (default 8765)")
    start.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    start.set_defaults(func=cmd_start)

    configure = sub.add_parser("configure", help="write a commented config.toml")
    _add_common(configure)
    configure.add_argument("--host")
    configure.add_argument("--port", type=int)
    configure.add_argument(
        "--key", action="append", default=[], help="a proxy access key (repeatable)"
    )
    configure.add_argument(
        "-o", "--output", default="config.toml", help="file to write (default config.toml)"
    )
    configure.add_argument("--force", action="store_true", help="overwrite an existing file")
    configure.add_argument(
        "--interactive",
        "-i",
        action="store_true",
        help="ask for each main setting (default when no flags are given on a terminal)",
    )
    configure.set_defaults(func=cmd_configure)

    doctor = sub.add_parser("doctor", help="check every upstream: reachable, models, context")
    _add_common(doctor)
    doctor.set_defaults(func=cmd_doctor)
    cli_memory.add_commands(sub)  # scopes, memories, summary, ..., import-chat, import-card
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (default: $MNEMOPROXY_CONFIG, else none)")
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="[NAME=]URL",
        help="an upstream base URL such as http://127.0.0.1:1234/v1 (repeatable)",
    )
    p.add_argument(
        "--upstream-key",
        help="API key for the --upstream given (prefer the config file or environment: "
        "command lines are visible to other users of the machine)",
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags as a nested settings mapping (only the flags actually given)."""
    server = {
        key: getattr(args, key)
        for key in ("host", "port", "log_level")
        if getattr(args, key, None) is not None
    }
    overrides: dict[str, Any] = {"server": server} if server else {}
    if args.upstream_key and len(args.upstream) != 1:
        # One key for several servers would send a cloud key to a local one too.
        raise SettingsError(
            "--upstream-key goes with exactly one --upstream; for several, give each its "
            "api_key in the config file or as MNEMOPROXY_UPSTREAMS__<NAME>__API_KEY"
        )
    upstreams = {}
    for i, spec in enumerate(args.upstream):
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = ("upstream" if i == 0 else f"upstream{i + 1}"), spec
        upstreams[name] = {"base_url": url}
        if args.upstream_key:
            upstreams[name]["api_key"] = args.upstream_key
    if upstreams:
        overrides["upstreams"] = upstreams
    return overrides


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load settings with the CLI flags on top."""
    return load_settings(args.config, overrides_from_args(args))


def with_discovered_upstreams(settings: Settings, found: list[FoundServer]) -> Settings:
    """Settings whose upstreams are the local servers found (or Ollama's default URL)."""
    upstreams = {server.kind: {"base_url": server.base_url} for server in found}
    if not upstreams:
        upstreams = {"local": {"base_url": FALLBACK_UPSTREAM}}
    data = settings.model_dump(mode="python")
    data["upstreams"] = upstreams
    return Settings.model_validate(data)


def cmd_start(args: argparse.Namespace) -> int:
    """`mnemoproxy start`: resolve upstreams, report them, serve until interrupted."""
    import uvicorn

    from proxy.app import build_app

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request URL at INFO: noise, and a query string may carry a key.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not settings.upstreams and settings.server.discover:
        ports = ", ".join(str(port) for _, port in LOCAL_SERVERS)
        print(f"no upstream configured; looking for a local model server on ports {ports}...")
        found = asyncio.run(probe_local_servers())
        for line in describe_servers(found):
            print(f"  found {line}")
        if not found:
            print(
                f"  none found; using {FALLBACK_UPSTREAM} (Ollama's default). Start your model "
                "server, or pass --upstream URL / run `mnemoproxy configure`."
            )
        settings = with_discovered_upstreams(settings, found)
    for line in asyncio.run(check_upstreams(settings)):
        print(line)
    host, port = settings.server.host, settings.server.port
    problem = preflight(settings)
    if problem:
        print(f"mnemoproxy: {problem}", file=sys.stderr)
        return 1
    if settings.memory.enabled:  # a mistyped path would be a new, empty memory: say which
        from proxy.app import database_path

        print(f"memory: {database_path(settings)}")
    print(f"mnemoproxy listening on http://{host}:{port}/v1 (point your app's base URL here)")
    if not _local(host) and not settings.auth.keys:
        print("warning: listening beyond this machine with no [auth] keys: anyone can use it")
    uvicorn.run(
        build_app(settings),
        host=host,
        port=port,
        log_level=settings.server.log_level,
        access_log=settings.server.access_log,
        server_header=False,
        timeout_graceful_shutdown=settings.server.shutdown_timeout,
    )
    return 0


def _local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def preflight(settings: Settings) -> str | None:
    """What would stop the server once started, said in one line before it claims to
    listen: the port taken, a memory file that is no usable database. (The server's own
    start says it too, but as a traceback after "listening on".)"""
    from proxy.app import database_path
    from proxy.memory.db import StoreError, open_connection
    from proxy.memory.migrations import migrate

    host, port = settings.server.host, settings.server.port
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if not settings.memory.enabled:
        return None
    path = database_path(settings)
    try:
        conn = open_connection(path)
        try:
            migrate(conn, path)
        finally:
            conn.close()
    except StoreError as exc:
        return str(exc)
    except OSError as exc:  # its directory cannot be made
        return f"cannot open the memory store {path}: {exc.strerror or exc}"
    return None


async def check_upstreams(settings: Settings, *, detail: bool = False) -> list[str]:
    """One line per upstream: reachable or not, its models and (with detail) context."""
    from proxy.app import router_from_settings

    router = router_from_settings(settings)
    pool = UpstreamPool(router.upstreams)
    try:
        return await asyncio.gather(*(_check(pool, u, detail) for u in router.upstreams.values()))
    finally:
        await pool.aclose()


async def _check(pool: UpstreamPool, upstream: Upstream, detail: bool) -> str:
    try:
        models = [m["id"] for m in await list_models(pool, upstream, timeout=5.0)]
    except Exception as exc:  # any failure is the answer here
        return f"  upstream {upstream.name}: NOT reachable at {upstream.base_url}: {exc}"
    shown = ", ".join(models[:8]) + (" ..." if len(models) > 8 else "")
    line = f"  upstream {upstream.name}: ok at {upstream.base_url}; models: {shown or 'none'}"
    if not detail:
        return line
    lines = [line]
    for model in models[:8] or [None]:
        found = await context_window(pool, upstream, model)
        if upstream.context_window:
            lines.append(f"    {model}: context {upstream.context_window} tokens (from config)")
        elif found:
            lines.append(f"    {model}: context {found[0]} tokens ({found[1]})")
        else:
            lines.append(f"    {model}: the server does not tell its context size")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    """`mnemoproxy doctor`: check each upstream; exit 1 if any is unreachable."""
    settings = settings_from_args(args)
    if not settings.upstreams:
        print("no upstream configured; looking for local model servers...")
        found = asyncio.run(probe_local_servers())
        if not found:
            print("  none found on the usual ports.")
            return 1
        settings = with_discovered_upstreams(settings, found)
    lines = asyncio.run(check_upstreams(settings, detail=True))
    for line in lines:
        print(line)
    return 1 if any("NOT reachable" in line for line in lines) else 0


def cmd_configure(args: argparse.Namespace) -> int:
    """`mnemoproxy configure`: write a commented config.toml from flags or answers."""
    output = Path(args.output)
    if output.is_dir():
        print(f"mnemoproxy: {output} is a directory; give a file name", file=sys.stderr)
        return 1
    if output.exists() and not args.force:
        print(f"mnemoproxy: {output} exists; use --force to overwrite", file=sys.stderr)
        return 1
    overrides = overrides_from_args(args)
    if args.key:
        overrides["auth"] = {"keys": args.key}
    asked = args.interactive or (
        sys.stdin.isatty() and not (args.upstream or args.host or args.port or args.key)
    )
    if asked:
        overrides = ask_settings(overrides)
    settings = load_settings(args.config, overrides)
    text = render_config(settings)
    has_secret = bool(settings.auth.keys or settings.auth.admin_keys) or any(
        u.api_key for u in settings.upstreams.values()
    )
    try:
        write_config(output, text, private=has_secret)
    except OSError as exc:
        print(f"mnemoproxy: cannot write {output}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {output}; start with: mnemoproxy start --config {output}")
    if not _local(settings.server.host) and not settings.auth.keys:
        print("warning: it listens beyond this machine with no [auth] keys: anyone can use it")
    return 0


def write_config(output: Path, text: str, *, private: bool) -> None:
    """Write the config file; with keys in it, readable by its owner only."""
    output.touch(mode=0o600 if private else 0o644, exist_ok=True)
    if private:
        output.chmod(0o600)
    output.write_text(text, encoding="utf-8")


def ask_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """Ask for the main settings on the terminal; Enter keeps the suggestion."""
    found = asyncio.run(probe_local_servers())
    suggestion = found[0].base_url if found else FALLBACK_UPSTREAM
    for line in describe_servers(found):
        print(f"found {line}")
    url = _ask("upstream base URL", suggestion)
    key = _ask("upstream API key (Enter for none)", "")
    host = _ask("listen address", "127.0.0.1")
    port = _ask("port", "8765")
    while not (port.isdigit() and 0 < int(port) < 65536):
        print(f"{port!r} is not a port number (1-65535)", file=sys.stderr)
        port = _ask("port", "8765")
    proxy_key = _ask("proxy access key for clients (Enter for none)", "")
    upstream: dict[str, Any] = {"base_url": url}
    if key:
        upstream["api_key"] = key
    overrides = {**overrides, "upstreams": {"main": upstream}}
    overrides["server"] = {**overrides.get("server", {}), "host": host, "port": int(port)}
    if proxy_key:
        overrides["auth"] = {"keys": [proxy_key]}
    return overrides


def _ask(question: str, default: str) -> str:
    """One answer from the terminal; the default on Enter or at the end of input."""
    shown = f" [{default}]" if default else ""
    try:
        answer = input(f"{question}{shown}: ").strip()
    except EOFError:
        print()
        answer = ""
    return answer or default


if __name__ == "__main__":
    sys.exit(main())
