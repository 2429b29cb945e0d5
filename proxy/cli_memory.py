"""The memory commands of `mnemoproxy`: scopes, memories, summary, style, scene, requests,
transcript, export, import, import-chat, import-card.

Every command speaks the memory API (`proxy.routes.memory_api`), either to a running
proxy (`--url`, default http://127.0.0.1:8765, with `--key` or $MNEMOPROXY_KEY) or, with
`--db PATH` or when no proxy answers, to the same routes run in-process over the
database file. So both ways behave alike; only search differs: without the proxy's
embedding model it is keyword-only (and says so).

Output is for people; `--json` prints the API's JSON for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from proxy.memory.scope import InvalidScope, validate_scope_name
from proxy.settings import Settings, load_settings

DEFAULT_URL = "http://127.0.0.1:8765"
KEY_ENV = "MNEMOPROXY_KEY"
URL_ENV = "MNEMOPROXY_URL"
TIMEOUT = 600.0  # an import of a large document may take minutes
SCOPE_ARGS = ("scope", "name", "new_name")  # the arguments that name a scope
# The X-Memory-Request-Id header's value (a uuid's hex); '.' or '..' would collapse the URL.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The options (argparse dests) each action of a command takes. The parser has one flat
# set per command, so one that the action does not take would pass silently (`add
# --pinned`, list's flag, made an unpinned note): `check_options` refuses it.
ACTION_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "scopes": {
        "list": (),
        "show": ("name",),
        "create": ("name", "label"),
        "rename": ("name", "new_name", "label"),
        "rm": ("name", "yes"),
        "set": ("name", "memory", "style", "llm"),
    },
    "memories": {
        "list": ("kind", "state", "since", "pinned", "limit"),
        "search": ("arg", "limit"),
        "add": ("arg", "text", "pin", "importance"),
        "edit": ("arg", "text", "importance"),
        "rm": ("arg",),
        "pin": ("arg", "off"),
    },
}
POSITIONALS = frozenset({"name", "new_name", "arg"})
# What `memories ACTION` needs when the memory id is missing.
_ID_USAGE = {
    "edit": "memories edit SCOPE ID --text TEXT and/or --importance X",
    "rm": "memories rm SCOPE ID",
    "pin": "memories pin SCOPE ID [--off]",
}


class CliError(Exception):
    """A failure to report in one line (exit status 1)."""


class Api:
    """The memory API, reached over HTTP or in-process."""

    def __init__(self, client: httpx.AsyncClient, where: str, owner: str | None, direct: bool):
        self.client = client
        self.where = where
        self.owner = owner
        self.direct = direct

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content: bytes | None = None,
    ) -> Any:
        """One call; the JSON answer (None for 204). API errors raise CliError."""
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        if self.owner is not None:
            query["owner"] = self.owner
        try:
            response = await self.client.request(
                method,
                "/memory" + path,
                params=query,
                json=body if content is None else None,
                content=content,
            )
        except httpx.HTTPError as exc:
            raise CliError(f"could not reach {self.where}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text.strip()[:300] or response.reason_phrase
            raise CliError(f"{message} ({response.status_code})")
        try:
            return response.json() if response.content else None
        except ValueError:  # --url names some other server
            raise CliError(f"{self.where} did not answer with JSON: is it mnemoproxy?") from None


def _param(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# -- the parser -----------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the memory commands to the `mnemoproxy` parser's sub-commands."""
    scopes = _command(sub, "scopes", "list and manage scopes (conversations)", cmd_scopes)
    scopes.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "show", "create", "rename", "rm", "set"],
    )
    scopes.add_argument("name", nargs="?", help="the scope")
    scopes.add_argument("new_name", nargs="?", help="rename: the new name")
    scopes.add_argument(
        "--label", help="create/rename: a label shown to people (rename --label '': none)"
    )
    scopes.add_argument("--memory", choices=["on", "off"], help="set: memory on or off")
    scopes.add_argument("--style", choices=["on", "off"], help="set: style sample on or off")
    scopes.add_argument(
        "--llm", choices=["on", "off"], help="set: background summaries and facts on or off"
    )
    scopes.add_argument("--yes", action="store_true", help="rm: do not ask")

    memories = _command(sub, "memories", "list, search, add, edit, delete, pin", cmd_memories)
    memories.add_argument("action", choices=["list", "search", "add", "edit", "rm", "pin"])
    memories.add_argument("scope")
    memories.add_argument("arg", nargs="?", help="search: the query; add: the text; else: id")
    memories.add_argument("--text", help="edit: the new text")
    memories.add_argument("--kind", help="list: kinds, comma-separated (turn,fact,note,...)")
    memories.add_argument("--state", help="list: active (default), retracted, superseded, all")
    memories.add_argument("--since", help="list: dated at or after (ISO date or unix seconds)")
    memories.add_argument("--pinned", action="store_true", help="list: pinned only")
    memories.add_argument("--pin", action="store_true", help="add: pin the note")
    memories.add_argument("--off", action="store_true", help="pin: unpin")
    memories.add_argument("--importance", type=float, help="add/edit: 0 to 1")
    memories.add_argument("--limit", type=int, help="how many to show")

    for name, what in (("summary", "the rolling summary"), ("style", "the style sample")):
        cmd = _command(sub, name, f"show, replace or clear {what}", cmd_summary_or_style)
        cmd.add_argument("scope")
        group = cmd.add_mutually_exclusive_group()
        group.add_argument("--set", metavar="TEXT", help="replace it with TEXT")
        group.add_argument("--set-file", metavar="FILE", help="replace it with a file's text")
        group.add_argument("--clear", action="store_true", help="remove it (kept in history)")
        group.add_argument("--history", action="store_true", help="show earlier versions")

    scene = _command(sub, "scene", "show or edit the scene ('' removes a part)", cmd_scene)
    scene.add_argument("scope")
    scene.add_argument("--character", help="who the character is")
    scene.add_argument("--location", help="where the scene is")
    scene.add_argument("--user", help="who the user is")
    scene.add_argument("--char-name", help="the character's name (overrides detection)")
    scene.add_argument("--user-name", help="the user's name (overrides detection)")
    scene.add_argument(
        "--clear", action="store_true", help="remove the whole scene (then set the parts given)"
    )

    requests = _command(sub, "requests", "the log of what was sent upstream", cmd_requests)
    requests.add_argument("scope", nargs="?", help="list this scope's requests")
    requests.add_argument("--id", help="show one request (its X-Memory-Request-Id)")
    requests.add_argument("--limit", type=int, default=20)

    transcript = _command(sub, "transcript", "the messages as stored", cmd_transcript)
    transcript.add_argument("scope")
    transcript.add_argument("--thread", type=int, help="one chat only")
    transcript.add_argument("--state", help="active, partial, undone (comma-separated)")
    transcript.add_argument("--limit", type=int, default=200)

    export = _command(sub, "export", "write a scope as one JSON document", cmd_export)
    export.add_argument("scope")
    export.add_argument(
        "-o",
        "--output",
        metavar="FILE|DIR",
        help="file to write, or a directory to write SCOPE.json into (default: standard output)",
    )

    for name, what, func in (
        ("import", "a scope document (from export)", cmd_import),
        ("import-chat", "a SillyTavern chat (.jsonl) as a new chat", cmd_import_chat),
        ("import-card", "a character card (PNG or JSON)", cmd_import_card),
    ):
        cmd = _command(sub, name, f"import {what} into a scope", func, creates=True)
        cmd.add_argument("scope")
        cmd.add_argument("file")
        cmd.add_argument(
            "--append", action="store_true", help="allow a scope that already has messages"
        )


def _command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help_text: str,
    func: Callable[[Api, argparse.Namespace], Awaitable[int]],
    *,
    creates: bool = False,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--url", help=f"the proxy (default ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--key", help=f"the proxy key (default ${KEY_ENV})")
    parser.add_argument("--db", help="open this database file directly (no proxy)")
    parser.add_argument("--config", help="config file (for the database path and port)")
    parser.add_argument("--owner", help="admin: the owner (key hash) whose scopes are meant")
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    # `creates`: in direct mode, may start a new database file (the imports).
    parser.set_defaults(func=lambda args: run(args, func), creates=creates)
    return parser


# -- running -------------------------------------------------------------------------------


def run(args: argparse.Namespace, func: Callable[[Api, argparse.Namespace], Awaitable[int]]) -> int:
    """Connect, run one command, report a failure in one line."""

    async def main() -> int:
        async with connect(args) as api:
            return await func(api, args)

    try:
        check_options(args)
        check_names(args)
        return asyncio.run(main())
    except CliError as exc:
        print(f"mnemoproxy: {exc}", file=sys.stderr)
        return 1


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[Api]:
    """The API of the running proxy, else (or with --db) of the database file."""
    key = args.key or os.environ.get(KEY_ENV) or None
    settings: Settings | None = None
    if not args.db:
        settings = load_settings(args.config)
        url = (args.url or os.environ.get(URL_ENV) or _settings_url(settings)).rstrip("/")
        if key and not key.isascii():  # httpx would fail to encode the header
            raise CliError("the proxy key must be ASCII text")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT)
        try:
            await client.get("/healthz", timeout=3.0)
        except httpx.TransportError:
            await client.aclose()
            if args.url:  # asked for that proxy: do not quietly use a file instead
                raise CliError(f"no proxy answers at {url}") from None
        else:
            try:
                yield Api(client, url, args.owner, direct=False)
            finally:
                await client.aclose()
            return
    async with _direct(args, settings, key) as api:
        yield api


@contextlib.asynccontextmanager
async def _direct(args: argparse.Namespace, settings: Settings | None, key: str | None):
    from proxy.app import database_path
    from proxy.memory.rank import Weights
    from proxy.memory.store import Store
    from proxy.routes.auth import Identity, owner_of
    from proxy.routes.memory_api import MemoryService, standalone_app

    settings = settings or load_settings(args.config)
    path = Path(args.db).expanduser() if args.db else database_path(settings)
    if not args.db:
        print(f"(no proxy answers; using the database {path} directly)", file=sys.stderr)
    if not path.exists() and not args.creates:
        raise CliError(f"no memory database at {path}")
    store = Store(path)
    try:
        await store.start()
    except Exception as exc:
        raise CliError(f"cannot open the memory database {path}: {exc}") from exc
    r = settings.recall
    service = MemoryService(
        store=store,
        weights=Weights(
            similarity=r.similarity,
            keyword=r.keyword,
            recency=r.recency,
            importance=r.importance,
            recency_half_life_days=r.half_life_days,
            min_score=r.min_score,
        ),
        candidates=r.candidates,
        identity=Identity(owner=owner_of(key) if key else "", admin=True),
    )
    transport = httpx.ASGITransport(app=standalone_app(service))
    client = httpx.AsyncClient(transport=transport, base_url="http://memory.db", timeout=TIMEOUT)
    try:
        yield Api(client, str(path), args.owner, direct=True)
    finally:
        await client.aclose()
        await store.close()


def _settings_url(settings: Settings) -> str:
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.server.port}"


def check_options(args: argparse.Namespace) -> None:
    """Refuse an option or argument given to an action that does not take it (see
    `ACTION_OPTIONS`), rather than run the action without it."""
    actions = ACTION_OPTIONS.get(args.command)
    if actions is None:
        return
    taken = actions[args.action]
    for dest in dict.fromkeys(d for options in actions.values() for d in options):
        value = getattr(args, dest, None)
        if dest in taken or value is None or value is False:  # not given: its default
            continue
        what = f"the extra argument {value!r}" if dest in POSITIONALS else _flag(dest)
        flags = [_flag(d) for d in taken if d not in POSITIONALS]
        hint = f" (it takes {', '.join(flags)})" if flags else ""
        raise CliError(f"{args.command} {args.action} does not take {what}{hint}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_names(args: argparse.Namespace) -> None:
    """Refuse a bad scope name or request id before connecting or reading any file."""
    for attr in SCOPE_ARGS:
        if getattr(args, attr, None):  # '' is "not given" (a command may need it: it says so)
            scope_name(getattr(args, attr))
    if getattr(args, "id", None) is not None:
        _request_id(args.id)


def scope_name(name: str) -> str:
    """`name` if it is a valid scope name, else a CliError saying why."""
    try:
        return validate_scope_name(name)
    except InvalidScope as exc:
        raise CliError(str(exc)) from None


def _scope(name: str) -> str:
    # Validated first: quote() leaves '.' and '..' alone, and the URL would collapse.
    return "/scopes/" + quote(scope_name(name), safe="")


def _request_id(value: str) -> str:
    if not _REQUEST_ID.fullmatch(value):
        raise CliError(
            f"a request id is letters, digits, '-' and '_' (X-Memory-Request-Id), not {value!r}"
        )
    return value


def _print(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> int:
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        human(data)
    return 0


# -- commands --------------------------------------------------------------------------------


async def cmd_scopes(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy scopes [list|show|create|rename|rm|set] [NAME]`."""
    if args.action == "list":
        data = await api.call("GET", "/scopes")
        return _print(args, data, _show_scopes)
    if not args.name:
        raise CliError(f"scopes {args.action} needs a scope name")
    path = _scope(args.name)
    if args.action == "show":
        data = await api.call("GET", path)
    elif args.action == "create":
        data = await api.call("POST", "/scopes", body={"name": args.name, "label": args.label})
    elif args.action == "rename":
        if not args.new_name and args.label is None:
            raise CliError("scopes rename NAME NEW_NAME (and/or --label LABEL)")
        body = {"name": args.new_name or None, "label": args.label}  # --label "": removed
        data = await api.call("PATCH", path, body={k: v for k, v in body.items() if v is not None})
    elif args.action == "set":
        changes = {"enabled": args.memory, "style": args.style, "llm": args.llm}
        body = {k: v == "on" for k, v in changes.items() if v is not None}
        if not body:
            raise CliError("scopes set NAME --memory on|off --style on|off --llm on|off")
        await api.call("PATCH", f"{path}/settings", body=body)
        data = await api.call("GET", path)
    else:  # rm
        if not args.yes and not _confirm(f"delete scope {args.name!r} and all it remembers?"):
            raise CliError("not deleted (pass --yes to delete without asking)")
        await api.call("DELETE", path)
        return _print(args, {"deleted": args.name}, lambda d: print(f"deleted {d['deleted']}"))
    return _print(args, data, _show_scope)


async def cmd_memories(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy memories list|search|add|edit|rm|pin SCOPE ...`."""
    path = _scope(args.scope) + "/memories"
    action = args.action
    if action == "list":
        params = {
            "kind": args.kind,
            "state": args.state,
            "since": args.since,
            "pinned": True if args.pinned else None,
            "limit": args.limit,
        }
        data = await api.call("GET", path, params=params)
        return _print(args, data, lambda d: _show_memories(d["memories"]))
    if action == "search":
        if not args.arg:
            raise CliError("memories search SCOPE QUERY")
        params = {"q": args.arg, "limit": args.limit}
        data = await api.call("GET", f"{path}/search", params=params)
        return _print(args, data, _show_search)
    if action == "add":
        if args.arg and args.text:  # one of the two would be dropped
            raise CliError("memories add takes the text once: as TEXT or with --text")
        text = args.arg or args.text
        if not text:
            raise CliError("memories add SCOPE TEXT [--pin]")
        body: dict[str, Any] = {"text": text, "pinned": args.pin}
        if args.importance is not None:
            body["importance"] = args.importance
        data = await api.call("POST", path, body=body)
        return _print(args, data, lambda d: _show_memories([d]))
    if not args.arg:
        raise CliError(_ID_USAGE[action])
    memory_id = _memory_id(args.arg)
    if action == "edit":
        body = {"text": args.text, "importance": args.importance}
        body = {k: v for k, v in body.items() if v is not None}
        if not body:
            raise CliError(_ID_USAGE["edit"])
        data = await api.call("PATCH", f"{path}/{memory_id}", body=body)
    elif action == "pin":
        data = await api.call("PATCH", f"{path}/{memory_id}", body={"pinned": not args.off})
    else:  # rm
        await api.call("DELETE", f"{path}/{memory_id}")
        return _print(
            args, {"deleted": memory_id}, lambda d: print(f"deleted memory {d['deleted']}")
        )
    return _print(args, data, lambda d: _show_memories([d]))


async def cmd_summary_or_style(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy summary|style SCOPE [--set TEXT | --set-file F | --clear | --history]`."""
    what = args.command
    path = f"{_scope(args.scope)}/{what}"
    text = args.set
    if args.set_file:
        text = _read_text(args.set_file)
    if text is not None:
        data = await api.call("PUT", path, body={"text": text})
    elif args.clear:
        await api.call("DELETE", path)
        return _print(args, {"cleared": what}, lambda d: print(f"{what} cleared"))
    elif args.history:
        data = await api.call("GET", f"{path}/history")
        return _print(args, data, lambda d: _show_history(what, d))
    else:
        data = await api.call("GET", path)
    return _print(args, data, lambda d: _show_text(what, d[what]))


async def cmd_scene(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy scene SCOPE [--character ... --location ... --user ...] [--clear]`."""
    path = f"{_scope(args.scope)}/scene"
    keys = ("character", "location", "user", "char_name", "user_name")
    changes = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    data: Any = {}
    if args.clear:  # with parts given too: the scene is replaced by them
        await api.call("DELETE", path)
    if changes:
        body = {k: (v or None) for k, v in changes.items()}  # '' removes a part
        data = await api.call("PATCH", path, body=body)
    elif not args.clear:
        data = await api.call("GET", path)
    return _print(args, data, _show_scene)


async def cmd_requests(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy requests SCOPE` (the log) or `requests --id ID` (one, in full)."""
    if args.id:
        data = await api.call("GET", f"/requests/{_request_id(args.id)}")
        return _print(args, data, _show_request)
    if not args.scope:
        raise CliError("requests SCOPE (to list) or requests --id REQUEST_ID (to show one)")
    data = await api.call("GET", f"{_scope(args.scope)}/requests", params={"limit": args.limit})
    return _print(args, data, _show_requests)


async def cmd_transcript(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy transcript SCOPE`."""
    params = {"thread": args.thread, "state": args.state, "limit": args.limit}
    data = await api.call("GET", f"{_scope(args.scope)}/transcript", params=params)
    return _print(args, data, _show_transcript)


async def cmd_export(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy export SCOPE [-o FILE|DIR]`."""
    to_stdout = not args.output or args.output == "-"
    output = None if to_stdout else export_path(args.output, args.scope)
    data = await api.call("GET", f"{_scope(args.scope)}/export")
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror}") from exc
    print(
        f"exported {args.scope}: {len(data['messages'])} messages, "
        f"{len(data['memories'])} memories -> {output}",
        file=sys.stderr,
    )
    return 0


def export_path(output: str, scope: str) -> Path:
    """Where `export -o OUTPUT` writes: OUTPUT, or OUTPUT/SCOPE.json when OUTPUT is a
    directory (as `cp` does; a valid scope name is a safe file name)."""
    path = Path(output).expanduser()
    if path.is_dir():
        return path / f"{scope}.json"
    if output.endswith(("/", os.sep)):  # meant a directory, and there is none
        raise CliError(f"no directory {output}")
    return path


async def cmd_import(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy import SCOPE FILE [--append]`: a scope document."""
    content = _read_bytes(args.file)
    data = await api.call(
        "POST",
        f"{_scope(args.scope)}/import",
        params={"append": args.append},
        content=content,
    )
    return _print(
        args,
        data,
        lambda d: print(
            f"imported into {args.scope}: {d['messages']} messages, {d['memories']} memories, "
            f"{d['summaries']} summaries"
            + (
                f"; kept the scope's own {', '.join(d['kept_existing'])}"
                if d["kept_existing"]
                else ""
            )
        ),
    )


async def cmd_import_chat(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy import-chat SCOPE FILE.jsonl [--append]`: the file as it is, to the
    API's own endpoint (`/import/sillytavern`), so that the CLI takes what the API takes
    and its errors name the file's lines; the proxy writes it in batches."""
    content = _read_bytes(args.file)
    name = "stdin" if args.file == "-" else Path(args.file).name
    print(f"importing {name} ({len(content):,} bytes)...", file=sys.stderr, flush=True)
    data = await api.call(
        "POST",
        f"{_scope(args.scope)}/import/sillytavern",
        params={"append": args.append},
        content=content,
    )
    return _print(args, data, lambda d: _show_chat_import(args.scope, d))


async def cmd_import_card(api: Api, args: argparse.Namespace) -> int:
    """`mnemoproxy import-card SCOPE FILE [--append]`."""
    data = await api.call(
        "POST",
        f"{_scope(args.scope)}/import/card",
        params={"append": args.append, "filename": Path(args.file).name},
        content=_read_bytes(args.file),
    )
    return _print(args, data, lambda d: _show_card(args.scope, d))


# -- output for people -------------------------------------------------------------------------


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _one_line(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _show_scopes(data: dict[str, Any]) -> None:
    scopes = data["scopes"]
    if not scopes:
        print("no scopes yet")
        return
    owners = {s["owner"] for s in scopes}
    print(f"{'SCOPE':<28} {'LABEL':<16} {'MSGS':>6} {'MEMS':>6} {'JOBS':>5}  LAST SEEN")
    for s in scopes:
        jobs = s["jobs"]["pending"] + s["jobs"]["running"]
        line = (
            f"{s['name']:<28} {(s['label'] or '-'):<16} {s['messages']['active']:>6} "
            f"{s['memories']['active']:>6} {jobs:>5}  {_when(s['last_seen'])}"
        )
        if len(owners) > 1:
            line += f"  owner {s['owner'] or '(none)'}"
        if not s["settings"]["enabled"]:
            line += "  [memory off]"
        print(line)


def _show_scope(s: dict[str, Any]) -> None:
    print(f"scope     {s['name']}" + (f" ({s['label']})" if s["label"] else ""))
    print(f"owner     {s['owner'] or '(no keys)'}")
    print(f"created   {_when(s['created_at'])}, last seen {_when(s['last_seen'])}")
    m = s["messages"]
    print(f"messages  {m['active']} active, {m['partial']} partial, {m['undone']} undone; ", end="")
    print(f"{s['threads']} chat(s)")
    mem = s["memories"]
    print(
        f"memories  {mem['active']} active ({mem['pinned']} pinned), {mem['retracted']} "
        f"retracted, {mem['superseded']} superseded"
    )
    j = s["jobs"]
    print(f"jobs      {j['pending']} pending, {j['running']} running, {j['failed']} failed")
    st = s["settings"]
    print(
        f"settings  memory {_on(st['enabled'])}, style sample {_on(st['style'])}, "
        f"background LLM work {_on(st['llm'])}"
    )
    if s["scene"]:
        _show_scene(s["scene"])


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _show_memories(memories: list[dict[str, Any]]) -> None:
    if not memories:
        print("no memories")
    for m in memories:
        flags = ("pinned " if m["pinned"] else "") + ("" if m["state"] == "active" else m["state"])
        who = f"{m['speaker']}: " if m["speaker"] else ""
        print(f"#{m['id']:<6} {m['kind']:<7} {_when(m['at'])}  {who}{_one_line(m['text'])}")
        if flags.strip():
            print(f"        [{flags.strip()}]")


def _show_search(data: dict[str, Any]) -> None:
    if data["mode"] == "keyword":
        print("(keyword search only: the embedding model is not loaded here)")
    if not data["results"]:
        print("nothing found")
    for r in data["results"]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["components"].items())
        who = f"{r['speaker']}: " if r["speaker"] else ""
        print(f"{r['score']:.3f}  #{r['id']:<6} {_when(r['at'])}  {who}{_one_line(r['text'], 70)}")
        print(f"        {parts}")


def _show_text(what: str, item: dict[str, Any] | None) -> None:
    if item is None:
        print(f"no {what}")
        return
    extra = f", {item['source']}" if "source" in item else ""
    if "enabled" in item and not item["enabled"]:
        extra += ", switched off"
    print(f"({what}, {_when(item.get('updated_at') or item.get('created_at'))}{extra})")
    print(item["text"])


def _show_history(what: str, data: dict[str, Any]) -> None:
    items = data.get("summaries") or data.get("history") or []
    if not items:
        print(f"no earlier {what}")
    for item in items:
        state = item.get("state") or f"replaced {_when(item.get('replaced_at'))}"
        when = _when(item.get("created_at") or item.get("updated_at"))
        print(f"[{when}, {state}] {_one_line(item['text'])}")


def _show_scene(scene: dict[str, Any]) -> None:
    if not scene:
        print("no scene")
    for key, value in scene.items():
        print(f"{key:<10} {_one_line(value)}")


def _show_requests(data: dict[str, Any]) -> None:
    if not data["requests"]:
        print("no logged requests")
    for r in data["requests"]:
        print(
            f"{r['id']}  {_when(r['created_at'])}  {r['model']}  in {r['tokens_in']} "
            f"sent {r['tokens_sent']} saved {r['tokens_saved']}  injected {r['injected']} "
            f"trimmed {r['trimmed']}"
            + (f"  errors: {'; '.join(r['errors'])}" if r["errors"] else "")
        )


def _show_request(r: dict[str, Any]) -> None:
    detail = r["detail"]
    print(f"request   {r['id']} ({_when(r['created_at'])}) in scope {r['scope']}")
    print(f"model     {r['model']} via {r['upstream']}; alignment {r['alignment']}")
    tokens = detail.get("tokens") or {}
    print(
        f"tokens    {tokens.get('original')} in, {tokens.get('sent')} sent, "
        f"{tokens.get('saved')} saved (block {tokens.get('block')}, budget {detail.get('budget')})"
    )
    print(f"trimmed   {len(detail.get('trimmed') or [])} messages")
    for item in detail.get("injected") or []:
        if item.get("pinned"):  # a note: always shown, so neither scored nor sourced
            why = "pinned note"
        else:
            why = f"score {item['score']:.3f} from messages {item['source_ids']}"
        print(f"injected  {item['kind']} #{item['memory_id']} {why}: {_one_line(item['text'], 60)}")
    if detail.get("timings"):
        print(f"timings   {detail['timings']}")
    for error in r["errors"]:
        print(f"error     {error}")


def _show_transcript(data: dict[str, Any]) -> None:
    for m in data["messages"]:
        who = m["speaker"] or m["role"]
        state = "" if m["state"] == "active" else f" [{m['state']}]"
        # A private message has no text to show (an older server sends no "private").
        text = "(private)" if m.get("private") else _one_line(m["content"])
        print(f"{m['seq']:>5} t{m['thread']} {_when(m['seen_at'])} {who}: {text}{state}")
    if data["next_after"] is not None:
        print(f"(more: --limit, or the API's after={data['next_after']})")


def _show_chat_import(scope: str, d: dict[str, Any]) -> None:
    print(f"imported {d['messages']} messages into {scope} (chat {d['thread']})")
    if d["errors"]:
        print(
            f"{len(d['errors'])} lines could not be read and were skipped (the rest was imported):"
        )
        for e in d["errors"][:20]:
            print(f"  line {e['line']}: {e['message']}")
    if d["warnings"]:
        print(f"{len(d['warnings'])} warnings (--json shows them all)")


def _show_card(scope: str, d: dict[str, Any]) -> None:
    print(f"imported card {d['name']} ({d['spec']}) into {scope}:")
    print(f"  scene: {', '.join(d['scene']) or 'nothing'}")
    print(f"  style sample: {'set' if d['style_sample'] else 'none in the card'}")
    print(f"  notes: {d['notes']} lorebook entries ({d['pinned_notes']} pinned)")
    for warning in d["warnings"]:
        print(f"  warning: {warning}")


# -- small helpers -----------------------------------------------------------------------------


def _memory_id(value: str | None) -> int:
    if value is None or not value.lstrip("#").isdigit():
        raise CliError(f"a memory id is a number, not {value!r}")
    return int(value.lstrip("#"))


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _read_bytes(name: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror}") from exc


def _read_text(name: str) -> str:
    return _read_bytes(name).decode("utf-8", "replace")
