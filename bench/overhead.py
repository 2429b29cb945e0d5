"""What the proxy adds to a streamed chat request: latency (paired) and throughput.

    .venv/bin/python bench/overhead.py                       # direct vs proxy, ~2 minutes
    .venv/bin/python bench/overhead.py --fast                # + proxy on uvloop/httptools
    .venv/bin/python bench/overhead.py --litellm             # + LiteLLM's proxy (own venv)
    .venv/bin/python bench/overhead.py --requests 100 --duration 5 --rounds 1   # quick

It starts its own processes and stops them at the end: the fake upstream
(`python -m tests.fakes.upstream`, 20 content chunks, no delay between them, so every
millisecond measured is HTTP and relay work), the proxy (`python -m proxy start`,
memory off), and optionally LiteLLM. Every request is what SillyTavern sends: a new
connection (`Connection: close`), its headers, a character chat with ~2k tokens of
history (~8k characters), `stream: true`. The client is a raw asyncio socket client
(HTTP/1.1 written by hand, chunked SSE read until `data: [DONE]`), so that it costs
little CPU next to the servers it measures.

1. Latency, paired: one request at a time; for each proxy, N pairs of requests
   (direct, proxy), the order alternating, so that noise hits both of a pair alike.
   TTFB is the time from connect to the first SSE event; total is to `data: [DONE]`.
   The per-pair difference (proxy minus direct) is what the proxy adds.
2. Throughput: N concurrent streams in a closed loop for `--duration` seconds after
   a warm-up; requests/s completed, latency under load, and the CPU each process
   spent per request (from /proc, less noisy than wall time on a shared machine).
   Direct-to-fake is the ceiling: a proxy cannot beat it on the same cores.

Everything shares the machine's cores (client, fake, proxy): figures are wall-clock
on whatever else the machine is doing. `--rounds` repeats the throughput runs; the
spread between rounds is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LITELLM_CONFIG = Path(__file__).resolve().parent / "litellm_config.yaml"
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MODEL = "fake-model"
REQUEST_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The proxy started with uvicorn's loop and parser chosen explicitly, and optionally
# another HTTP client towards the upstream: the same settings and app as `mnemoproxy
# start`, built through the CLI's own parser. For experiments only:
# - httpx2 (pydantic's fork of httpx, same API) stands in for the httpx module;
# - aiohttp replaces UpstreamPool.send/aclose with a thin adapter offering what the
#   chat route uses of an httpx response (status_code, headers, aiter_bytes, aread,
#   aclose). Its errors are not translated; fine for a benchmark, not for use.
_PROXY_LAUNCHER = """
import sys
loop, http, client, *argv = sys.argv[1:]
if client == "httpx2":
    import httpx2
    sys.modules["httpx"] = httpx2
import uvicorn
from proxy.app import build_app
from proxy.cli import build_parser, settings_from_args
if client == "aiohttp":
    import aiohttp
    from proxy.upstreams.client import UpstreamPool

    class AiohttpResponse:
        def __init__(self, response):
            self._response = response
            self.status_code = response.status
            self.headers = response.headers

        async def aiter_bytes(self):
            async for chunk in self._response.content.iter_any():
                yield chunk

        async def aread(self):
            return await self._response.read()

        async def aclose(self):
            self._response.release()

    sessions = {}

    async def send(self, upstream, method, path, *, headers, content=None, params=None):
        session = sessions.get(upstream.name)
        if session is None:
            connector = aiohttp.TCPConnector(limit=upstream.max_connections)
            session = sessions[upstream.name] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=["User-Agent"]
            )
        url = upstream.url(path) + (f"?{params}" if params else "")
        response = await session.request(method, url, headers=headers, data=content)
        return AiohttpResponse(response)

    async def aclose(self):
        for session in sessions.values():
            await session.close()

    UpstreamPool.send, UpstreamPool.aclose = send, aclose
settings = settings_from_args(build_parser().parse_args(["start", *argv]))
uvicorn.run(build_app(settings), host=settings.server.host, port=settings.server.port,
            log_level="warning", access_log=False, server_header=False, loop=loop, http=http)
"""


@dataclass(frozen=True)
class ProxyVariant:
    """How to start the proxy: `mnemoproxy start` as users do, or through the launcher."""

    name: str
    loop: str = ""  # empty: `python -m proxy start` (uvicorn's "auto")
    http: str = ""
    client: str = "httpx"
    about: str = ""


VARIANTS = {
    v.name: v
    for v in (
        ProxyVariant("proxy", about="`python -m proxy start`, as users run it"),
        ProxyVariant("proxy-fast", "uvloop", "httptools", about="on uvloop + httptools"),
        ProxyVariant("proxy-h11", "asyncio", "h11", about="on asyncio + h11, forced"),
        ProxyVariant("proxy-httpx2", "asyncio", "h11", "httpx2", about="httpx2 for httpx"),
        ProxyVariant("proxy-aiohttp", "asyncio", "h11", "aiohttp", about="aiohttp upstream"),
        ProxyVariant(
            "proxy-fast-aiohttp", "uvloop", "httptools", "aiohttp", about="both of the above"
        ),
    )
}


# -- the request ------------------------------------------------------------------------


def sillytavern_body(history_chars: int = 8000) -> dict[str, Any]:
    """A character chat as SillyTavern's Custom (OpenAI-compatible) source sends it."""
    turns = [
        "I push open the tavern door and shake the rain off my coat. The room smells of "
        "smoke and wet wool, and the fire is low. I look for a free table near the hearth "
        "and ask the barkeep whether anyone has seen a courier from the northern pass.",
        'Mira glances up from the ledger, quill still in hand. "A courier? Not since the '
        'bridge washed out three nights ago," she says, wiping her hands on her apron. '
        "\"Sit. You look half drowned. There's stew, and the cider is warm. If your man "
        "comes through, he'll come through that door, and he'll be hungry too.\"",
    ]
    messages: list[dict[str, Any]] = [
        {
            "role": "system",
            "content": "Write Mira's next reply in a fictional chat between Mira and Tom. "
            "Write one reply only, in internet RP style, italicize actions.",
        },
        {
            "role": "system",
            "content": "[Lorebook: The Silver Kettle is a tavern at the foot of the northern "
            "pass. The bridge over the Grey River washed out in the autumn storms.]",
        },
        {
            "role": "system",
            "content": "[Mira's personality: warm, dry humour, keeps the tavern's accounts, "
            "distrusts the guild; scenario: a stormy night at the Silver Kettle.]",
        },
        {"role": "system", "content": "[Start a new Chat]"},
        {
            "role": "assistant",
            "content": "*The fire crackles as Mira looks up from behind the bar.* Welcome "
            "to the Silver Kettle, traveller. Mind the puddle; the roof leaks when the "
            "wind turns west.",
        },
    ]
    used, i = 0, 0
    while used < history_chars:
        text = f"(turn {i}) " + turns[i % 2]
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        used += len(text)
        i += 1
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": f"(turn {i}) " + turns[0]})
    return {
        "messages": messages,
        "model": MODEL,
        "temperature": 1,
        "max_tokens": 300,
        "stream": True,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_p": 1,
        "logit_bias": {},
    }


def request_bytes(port: int, body: bytes) -> bytes:
    """The whole HTTP/1.1 request, headers as SillyTavern (node-fetch) sends them."""
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Authorization: Bearer undefined\r\n"
        "User-Agent: node-fetch/1.0 (+https://github.com/bitinn/node-fetch)\r\n"
        "Accept: */*\r\n"
        "Accept-Encoding: gzip,deflate\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


# -- the client -------------------------------------------------------------------------


@dataclass
class Sample:
    """One streamed request as the client saw it (times in seconds from connect)."""

    ok: bool
    ttfb: float = 0.0  # first SSE event
    total: float = 0.0  # `data: [DONE]`
    events: int = 0
    end: float = 0.0  # perf_counter() at the end
    error: str = ""


class StreamError(Exception):
    """The response was not a complete 200 SSE stream."""


async def stream_once(port: int, raw_request: bytes) -> Sample:
    """Send one request on a new connection; read the SSE answer until [DONE]."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(_stream(port, raw_request, t0), REQUEST_TIMEOUT)
    except (TimeoutError, OSError, EOFError, ValueError, StreamError) as exc:
        return Sample(ok=False, end=time.perf_counter(), error=f"{type(exc).__name__}: {exc}")


async def _stream(port: int, raw_request: bytes, t0: float) -> Sample:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw_request)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or parts[1] != b"200":
            rest = b""  # headers and the error body, until the server closes
            with contextlib.suppress(TimeoutError):
                while chunk := await asyncio.wait_for(reader.read(4096), 2.0):
                    rest += chunk
            detail = rest.partition(b"\r\n\r\n")[2][-300:].decode("utf-8", "replace")
            raise StreamError(f"{status_line.strip().decode('latin-1')}: {detail}")
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        sample = Sample(ok=False)
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            buffer += data
            while (cut := buffer.find(b"\n\n")) >= 0:
                event, buffer = buffer[:cut], buffer[cut + 2 :]
                now = time.perf_counter()
                if sample.events == 0:
                    sample.ttfb = now - t0
                sample.events += 1
                if event.startswith(b"data: [DONE]"):
                    sample.total = now - t0
                    sample.ok = True
        if not sample.ok:
            raise StreamError(f"stream ended without [DONE] after {sample.events} events")
        sample.end = time.perf_counter()
        return sample
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- the processes ----------------------------------------------------------------------


@dataclass
class Target:
    """Something answering chat completions: the fake itself, or a proxy in front of it."""

    name: str
    port: int
    pid: int  # the server's process (CPU is summed over it and its children)
    raw_request: bytes = b""


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{url} not ready within {timeout:g} s:\n{tail}")


class Processes:
    """Starts the servers under test and always stops them (context manager)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        ready_url: str,
        *,
        env: dict[str, str | None] | None = None,
        timeout: float = 30.0,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` (output to a log file) and wait until `ready_url` answers.

        `env` is added to this process's environment; a None value removes the name.
        """
        log = self.workdir / f"{name}.log"
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        wait_ready(ready_url, proc, log, timeout)
        return proc

    def stop(self) -> None:
        """Terminate every process started here (children first asked to go too)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fake(procs: Processes, python: str, chunks: int, delay: float) -> Target:
    """The fake OpenAI upstream, alone in its process."""
    port = free_port()
    argv = [python, "-m", "tests.fakes.upstream", "--port", str(port), "--chunks", str(chunks)]
    argv += ["--delay-between", str(delay)]
    proc = procs.start("fake", argv, f"http://{HOST}:{port}/v1/models")
    return Target("direct", port, proc.pid)


def start_proxy(
    procs: Processes,
    python: str,
    upstream: Target,
    variant: ProxyVariant,
    extra_path: str | None,
) -> Target:
    """mnemoproxy with memory off, as `variant` says."""
    port = free_port()
    args = ["--port", str(port), "--upstream", f"http://{HOST}:{upstream.port}/v1"]
    args += ["--log-level", "warning"]
    env: dict[str, str | None] = {"MNEMOPROXY_MEMORY__ENABLED": "false", "MNEMOPROXY_CONFIG": None}
    if not variant.loop:
        argv = [python, "-m", "proxy", "start", *args]
    else:
        argv = [python, "-c", _PROXY_LAUNCHER, variant.loop, variant.http, variant.client, *args]
    if extra_path and variant.loop:  # from `pip install --target DIR uvloop httptools ...`
        env["PYTHONPATH"] = os.pathsep.join([extra_path, str(ROOT)])
    proc = procs.start(variant.name, argv, f"http://{HOST}:{port}/healthz", env=env)
    return Target(variant.name, port, proc.pid)


def start_litellm(procs: Processes, litellm_bin: str, upstream: Target) -> Target:
    """LiteLLM's proxy in front of the same fake: one worker, no database, no telemetry."""
    port = free_port()
    argv = [litellm_bin, "--config", str(LITELLM_CONFIG), "--host", HOST, "--port", str(port)]
    argv += ["--num_workers", "1"]
    env = {
        "FAKE_UPSTREAM_BASE": f"http://{HOST}:{upstream.port}/v1",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_MODE": "PRODUCTION",  # no .env loading
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download at start
        "DATABASE_URL": None,
        "LITELLM_MASTER_KEY": None,
        "STORE_MODEL_IN_DB": "False",
    }
    ready = f"http://{HOST}:{port}/health/liveliness"
    proc = procs.start("litellm", argv, ready, env=env, timeout=180.0)
    return Target("litellm", port, proc.pid)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of `pid` and its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        todo.extend(children.get(current, []))
    return total


# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95 (and mean) in milliseconds."""
    return {
        "p50": round(percentile(values, 50) * 1000, 3),
        "p95": round(percentile(values, 95) * 1000, 3),
        "mean": round(sum(values) / len(values) * 1000, 3) if values else float("nan"),
    }


# -- 1. paired latency ------------------------------------------------------------------


@dataclass
class LatencyResult:
    """Paired latency of each target, and its difference from direct, in ms."""

    requests: int
    ttfb: dict[str, dict[str, float]] = field(default_factory=dict)
    total: dict[str, dict[str, float]] = field(default_factory=dict)
    added_ttfb: dict[str, dict[str, float]] = field(default_factory=dict)
    added_total: dict[str, dict[str, float]] = field(default_factory=dict)
    events: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # the server's process


async def paired_latency(targets: list[Target], requests: int, warmup: int) -> LatencyResult:
    """For each proxy in turn, `requests` pairs (direct, proxy), one request at a time.

    The order inside a pair alternates; each proxy is compared with the direct requests
    of its own pairs, so a proxy's after-work (LiteLLM logs in the background after each
    answer) cannot slow another proxy's requests. `direct` pools every phase's.
    """
    direct, proxies = targets[0], targets[1:]
    result = LatencyResult(requests=requests)
    direct_samples: list[Sample] = []
    fake_cpu, fake_served = 0.0, 0
    for target in proxies or [direct]:
        pairs: list[tuple[Sample, Sample]] = []
        cpu = (0.0, 0.0)
        for i in range(warmup + requests):
            if i == warmup:
                cpu = (cpu_seconds(direct.pid), cpu_seconds(target.pid))
            order = (direct, target) if i % 2 == 0 else (target, direct)
            got = [await stream_once(t.port, t.raw_request) for t in order]
            if i >= warmup:
                pairs.append((got[0], got[1]) if i % 2 == 0 else (got[1], got[0]))
        fake_cpu += cpu_seconds(direct.pid) - cpu[0]
        fake_served += requests * (1 if target is direct else 2)
        direct_samples += [b for b, _ in pairs]
        if target is direct:
            break
        mine = [s for _, s in pairs]
        _describe(result, target.name, mine)
        spent = cpu_seconds(target.pid) - cpu[1]
        result.cpu_ms_per_request[target.name] = round(spent / requests * 1000, 3)
        both = [(s, b) for b, s in pairs if s.ok and b.ok]
        result.added_ttfb[target.name] = summary_ms([s.ttfb - b.ttfb for s, b in both])
        result.added_total[target.name] = summary_ms([s.total - b.total for s, b in both])
    _describe(result, direct.name, direct_samples)
    result.cpu_ms_per_request[direct.name] = round(fake_cpu / max(fake_served, 1) * 1000, 3)
    return result


def _describe(result: LatencyResult, name: str, samples: list[Sample]) -> None:
    good = [s for s in samples if s.ok]
    result.errors[name] = len(samples) - len(good)
    result.ttfb[name] = summary_ms([s.ttfb for s in good])
    result.total[name] = summary_ms([s.total for s in good])
    result.events[name] = round(sum(s.events for s in good) / max(len(good), 1), 1)


# -- 2. throughput ----------------------------------------------------------------------


@dataclass
class ThroughputRun:
    """One closed-loop run of `concurrency` streams against one target."""

    target: str
    concurrency: int
    round: int
    seconds: float
    completed: int
    errors: int
    rps: float
    total_ms: dict[str, float]
    ttfb_ms: dict[str, float]
    cpu_ms_per_request: dict[str, float]  # per process: client, fake, and the target
    first_error: str = ""


async def throughput(
    target: Target,
    fake: Target,
    concurrency: int,
    duration: float,
    warmup: float,
    round_: int,
) -> ThroughputRun:
    """`concurrency` workers, each sending requests back to back, for `duration` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup, start + warmup + duration)
    measured: list[Sample] = []
    cpu_before: dict[str, float] = {}

    async def worker() -> None:
        while loop.time() < window[1]:
            sample = await stream_once(target.port, target.raw_request)
            now = loop.time()
            if window[0] <= now <= window[1]:
                measured.append(sample)

    async def mark() -> None:
        await asyncio.sleep(warmup)
        cpu_before.update(_cpu_now(target, fake))

    marker = asyncio.create_task(mark())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await marker
    # cpu_before was taken at the window start; take the end just after the last worker.
    cpu_after = _cpu_now(target, fake)
    good = [s for s in measured if s.ok]
    errors = [s for s in measured if not s.ok]
    cpu = {
        name: round((cpu_after[name] - cpu_before[name]) / max(len(good), 1) * 1000, 3)
        for name in cpu_after
    }
    return ThroughputRun(
        target=target.name,
        concurrency=concurrency,
        round=round_,
        seconds=duration,
        completed=len(good),
        errors=len(errors),
        rps=round(len(good) / duration, 1),
        total_ms=summary_ms([s.total for s in good]),
        ttfb_ms=summary_ms([s.ttfb for s in good]),
        cpu_ms_per_request=cpu,
        first_error=errors[0].error if errors else "",
    )


def _cpu_now(target: Target, fake: Target) -> dict[str, float]:
    now = {"client": time.process_time(), "fake": cpu_seconds(fake.pid)}
    if target.pid != fake.pid:
        now[target.name] = cpu_seconds(target.pid)
    return now


# -- report -----------------------------------------------------------------------------


def print_latency(result: LatencyResult) -> None:
    """The paired latency table."""
    print(f"\nLatency, {result.requests} pairs (direct, target) each, one at a time, ms")
    print(
        f"{'target':<18}{'TTFB p50':>10}{'p95':>9}{'total p50':>11}{'p95':>9}"
        f"{'events':>8}{'errors':>8}{'CPU ms/req':>12}"
    )
    for name in sorted(result.ttfb, key=_order):
        t, s = result.ttfb[name], result.total[name]
        print(
            f"{name:<18}{t['p50']:>10.2f}{t['p95']:>9.2f}{s['p50']:>11.2f}{s['p95']:>9.2f}"
            f"{result.events[name]:>8}{result.errors[name]:>8}"
            f"{result.cpu_ms_per_request[name]:>12.2f}"
        )
    print("added vs direct (per-pair difference)")
    for name in result.added_ttfb:
        t, s = result.added_ttfb[name], result.added_total[name]
        print(f"{name:<18}{t['p50']:>10.2f}{t['p95']:>9.2f}{s['p50']:>11.2f}{s['p95']:>9.2f}")


def print_throughput(runs: list[ThroughputRun]) -> None:
    """The throughput table: median over rounds, with the range."""
    print("\nThroughput (closed loop, new connection per request)")
    print(
        f"{'target':<18}{'conc':>5}{'rps med':>9}{'  (min-max)':<15}{'total p50':>10}"
        f"{'p95':>8}{'errors':>7}  CPU ms/request (client, fake, target)"
    )
    keys = sorted({(r.target, r.concurrency) for r in runs}, key=lambda k: (k[1], _order(k[0])))
    for name, conc in keys:
        mine = [r for r in runs if r.target == name and r.concurrency == conc]
        rps = [r.rps for r in mine]
        best = sorted(mine, key=lambda r: r.rps)[len(mine) // 2]
        cpu = ", ".join(f"{v:.2f}" for v in best.cpu_ms_per_request.values())
        spread = f"({min(rps):.0f}-{max(rps):.0f})"
        print(
            f"{name:<18}{conc:>5}{percentile(rps, 50):>9.1f}  {spread:<13}"
            f"{best.total_ms['p50']:>10.1f}{best.total_ms['p95']:>8.1f}"
            f"{sum(r.errors for r in mine):>7}  {cpu}"
        )
        if best.first_error:
            print(f"{'':<18}first error: {best.first_error}")


def _order(name: str) -> int:
    order = ["direct", *VARIANTS, "litellm"]
    return order.index(name) if name in order else len(order)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="pairs per proxy (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="pairs not counted, per proxy")
    p.add_argument("--concurrency", default="16,64", help="comma-separated (default 16,64)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    p.add_argument("--rps-warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--rounds", type=int, default=2, help="throughput repetitions (default 2)")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per reply")
    p.add_argument("--delay-between", type=float, default=0.0, help="fake's delay (s)")
    p.add_argument("--history-chars", type=int, default=8000, help="~4 characters a token")
    p.add_argument("--python", default=sys.executable, help="python for the fake and proxy")
    p.add_argument(
        "--proxies",
        default="proxy",
        help="comma-separated proxy variants (default: proxy; empty: none):\n"
        + "\n".join(f"  {v.name}: {v.about}" for v in VARIANTS.values()),
    )
    p.add_argument("--fast", action="store_true", help="add proxy-fast to --proxies")
    p.add_argument(
        "--extra-path",
        help="a directory from `pip install --target DIR uvloop httptools aiohttp`, put on\n"
        "the PYTHONPATH of the variants other than `proxy` (not the fake's): the venv\n"
        "stays as it is",
    )
    p.add_argument("--litellm", action="store_true", help="also LiteLLM's proxy")
    p.add_argument(
        "--litellm-bin",
        default="/tmp/litellm-venv/bin/litellm",
        help="the litellm command (default /tmp/litellm-venv/bin/litellm)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    names += ["proxy-fast"] if args.fast and "proxy-fast" not in names else []
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown proxy variant(s): {', '.join(unknown)}")
    args.variants = [VARIANTS[n] for n in names]
    return args


async def run(args: argparse.Namespace, targets: list[Target], fake: Target) -> dict[str, Any]:
    """Both measurements over the started targets."""
    out: dict[str, Any] = {}
    if not args.skip_latency:
        latency = await paired_latency(targets, args.requests, args.warmup)
        print_latency(latency)
        out["latency"] = asdict(latency)
    if not args.skip_throughput:
        runs: list[ThroughputRun] = []
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        for round_ in range(args.rounds):
            for conc in levels:
                shift = round_ % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    run = await throughput(
                        target, fake, conc, args.duration, args.rps_warmup, round_
                    )
                    runs.append(run)
                    print(
                        f"  round {round_} c={conc:<3} {target.name:<18} {run.rps:8.1f} rps"
                        f"  errors {run.errors}",
                        flush=True,
                    )
                    await asyncio.sleep(1.0)  # let closing connections settle
        print_throughput(runs)
        out["throughput"] = [asdict(r) for r in runs]
    return out


@contextlib.contextmanager
def started(args: argparse.Namespace) -> Iterator[tuple[list[Target], Target]]:
    """The fake and every proxy asked for, stopped on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="mnemo-overhead-"))
    try:
        with Processes(workdir) as procs:
            fake = start_fake(procs, args.python, args.chunks, args.delay_between)
            targets = [fake]
            for variant in args.variants:
                targets.append(start_proxy(procs, args.python, fake, variant, args.extra_path))
            if args.litellm:
                targets.append(start_litellm(procs, args.litellm_bin, fake))
            yield targets, fake
    finally:
        if args.keep_logs:
            print(f"server logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Start everything, measure, print, stop everything."""
    args = parse_args(argv)
    body = json.dumps(sillytavern_body(args.history_chars)).encode()
    load_before = os.getloadavg()
    print(
        f"body {len(body)} bytes ({len(body) // 4} tokens at ~4 chars/token); fake: "
        f"{args.chunks} chunks, {args.delay_between * 1000:g} ms between; "
        f"load avg {load_before[0]:.2f}; {os.cpu_count()} CPUs; Python {platform.python_version()}"
    )
    with started(args) as (targets, fake):
        for target in targets:
            target.raw_request = request_bytes(target.port, body)
        results = asyncio.run(run(args, targets, fake))
    results["setup"] = {
        "body_bytes": len(body),
        "chunks": args.chunks,
        "delay_between_s": args.delay_between,
        "requests": args.requests,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(f"load avg after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
