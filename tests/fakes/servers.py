"""Run an ASGI app under a real uvicorn server, on a real socket, from sync tests.

`httpx.ASGITransport` buffers whole responses, so streaming timing and client
disconnects can only be tested over a socket. `run_server` starts uvicorn in a
background thread on a port of its own (port 0 picks a free one), waits until it
accepts connections, and stops it on exit. A failing lifespan startup of the app is
raised in the caller's thread, as the app's own exception when there is one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

ASGIApp = Any  # (scope, receive, send) -> Awaitable[None]; typed loosely on purpose


@dataclass(frozen=True)
class RunningServer:
    """A started server: where it listens, and the uvicorn server behind it."""

    host: str
    port: int
    server: uvicorn.Server = field(repr=False, compare=False)

    @property
    def url(self) -> str:
        """The base URL, e.g. "http://127.0.0.1:54321" (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@contextlib.contextmanager
def run_server(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    lifespan: str = "on",
    startup_timeout: float = 30.0,
    shutdown_timeout: float = 10.0,
    **config: Any,
) -> Iterator[RunningServer]:
    """Serve `app` with uvicorn in a background thread for the duration of the block.

    Yields a `RunningServer` with `.port` and `.url`. Raises the app's exception (or a
    RuntimeError naming the failure) when the server cannot start, TimeoutError when it
    does not start within `startup_timeout`. On exit it asks uvicorn to stop, waits for
    the thread, and raises an exception of the app's lifespan shutdown, if any, unless
    the block itself raised. Extra keyword arguments go to `uvicorn.Config`.
    """
    sock = _bind(host, port)
    watch = _LifespanWatch(app)
    options: dict[str, Any] = {
        "log_level": "warning",
        # Leave global logging alone: uvicorn's records go to the root logger, where
        # pytest captures them and shows them with a failing test.
        "log_config": None,
        "access_log": False,
        # A request still in flight at exit (a hung stream) must not block forever.
        "timeout_graceful_shutdown": 3,
    }
    options.update(config)
    server = uvicorn.Server(
        uvicorn.Config(watch, host=host, port=sock.getsockname()[1], lifespan=lifespan, **options)
    )
    crashed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit on a failed startup, too
            crashed.append(exc)

    thread = threading.Thread(target=serve, name=f"uvicorn:{sock.getsockname()[1]}", daemon=True)
    thread.start()
    try:
        _wait_started(server, thread, startup_timeout)
    except BaseException as exc:
        _stop(server, thread, shutdown_timeout)
        sock.close()
        raise _startup_error(watch, crashed) or exc from None
    running = RunningServer(host=host, port=sock.getsockname()[1], server=server)

    block_failed = False
    try:
        yield running
    except BaseException:
        block_failed = True
        raise
    finally:
        stopped = _stop(server, thread, shutdown_timeout)
        sock.close()
        if not block_failed:
            if not stopped:
                raise RuntimeError(f"uvicorn at {running.url} did not stop")
            if watch.shutdown_error is not None:
                raise watch.shutdown_error
            for exc in crashed:
                if not isinstance(exc, SystemExit):
                    raise RuntimeError(f"uvicorn at {running.url} crashed") from exc


class _LifespanWatch:
    """Wraps the app to keep what its lifespan startup/shutdown raised or reported.

    uvicorn only logs a lifespan failure and exits; keeping the exception lets
    `run_server` hand it to the test that started the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.started = False
        self.startup_error: BaseException | None = None
        self.startup_message: str | None = None
        self.shutdown_error: BaseException | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watched_send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                self.started = True
            elif kind == "lifespan.startup.failed":
                self.startup_message = message.get("message") or "(no message)"
            elif kind == "lifespan.shutdown.failed" and self.shutdown_error is None:
                self.shutdown_error = RuntimeError(
                    f"ASGI lifespan shutdown failed: {message.get('message') or '(no message)'}"
                )
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except BaseException as exc:
            if self.started:
                self.shutdown_error = exc
            else:
                self.startup_error = exc
            raise


def _bind(host: str, port: int) -> socket.socket:
    # Binding here, not in uvicorn, is what tells us the port that port 0 picked.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _wait_started(server: uvicorn.Server, thread: threading.Thread, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup (see the captured log)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"uvicorn did not start within {timeout} s")
        time.sleep(0.002)


def _stop(server: uvicorn.Server, thread: threading.Thread, timeout: float) -> bool:
    """Ask uvicorn to exit and wait for its thread; force it if it lingers."""
    server.should_exit = True
    thread.join(timeout)
    if thread.is_alive():
        server.force_exit = True
        thread.join(timeout)
    return not thread.is_alive()


def _startup_error(watch: _LifespanWatch, crashed: list[BaseException]) -> BaseException | None:
    if watch.startup_error is not None:
        error = watch.startup_error
        error.add_note("(raised by the app's lifespan startup under run_server)")
        return error
    if watch.startup_message is not None:
        return RuntimeError(f"ASGI lifespan startup failed: {watch.startup_message}")
    for exc in crashed:
        if not isinstance(exc, SystemExit):
            return exc
    return None
