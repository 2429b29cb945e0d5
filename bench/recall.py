"""Recall on LongMemEval, through the proxy's own import and chat paths (issue #6).

    .venv/bin/python bench/recall.py DATA.json.xz                  # the 100-question subset
    .venv/bin/python bench/recall.py DATA.json.xz --size 0         # every question
    .venv/bin/python bench/recall.py DATA.json.xz --prefill 2      # embed the subset first,
                                                                   # in 2 processes
    .venv/bin/python bench/recall.py DATA.json.xz --ttfb-only      # added TTFB only

For each question of a fixed, seeded, stratified subset (`bench/longmemeval.py`):

1. its haystack becomes a SillyTavern chat (one message a line, each with its
   session's date) and is imported into a fresh scope (``lme-<question id>``) with
   ``POST /memory/scopes/{scope}/import/sillytavern``: the write path of live turns;
2. the bench waits until the scope has no pending background job (every memory
   embedded);
3. the question is asked through ``POST /s/{scope}/v1/chat/completions`` with
   ``X-Memory-Write: off`` and ``X-Memory-Now`` = the question's date, as a system
   prompt plus the question alone, so the memory block is the only way evidence can
   reach the upstream;
4. the fake upstream (`tests.fakes.upstream`, in this process) records the prompt;
   scoring reads that prompt (`longmemeval.score`).

The memory block caps (``[caps] total`` = ``memories`` = 500, 1000, 2000 tokens) are
separate passes: the proxy is restarted with each cap over the same database, the
first pass imports, the others only ask. The proxy runs as users start it
(``python -m proxy start --config ...``), with the background LLM work and the style
sample off (neither can help a fake upstream; the style sample would put the first
haystack reply in every prompt).

Embeddings: the real all-MiniLM-L6-v2 (int8 ONNX by default, ``--model torch`` for
sentence-transformers) served to the proxy by this process through the proxy's
``[embeddings] backend = "upstream"``, with a persistent cache of vectors by text
(``bench/results/embeddings-<model>.sqlite``), because embedding a haystack (~1,000
pieces of ~200 tokens) costs about a CPU-minute here and many runs embed the same
texts. ``--prefill N`` embeds the subset's texts in N processes before the proxy
starts (the keys are computed with the proxy's own `split_text` and
`embedding_key`; a key the proxy asks for that was not prefilled is embedded then).

Output: a table per cap (recall by question type, injected tokens) on stdout, and
JSON (``--json``, default ``bench/results/recall-<timestamp>.json``) holding the
settings, the subset's ids and every question's result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from bench import longmemeval as lme  # noqa: E402
from proxy.inject.tokens import TokenCounter, encoding_for_model, prepare_tiktoken_cache  # noqa: E402
from proxy.memory.embed import LocalEmbedder, OnnxEmbedder  # noqa: E402
from proxy.memory.record import split_text  # noqa: E402
from proxy.memory.worker import embedding_key  # noqa: E402
from tests.fakes.servers import run_server  # noqa: E402
from tests.fakes.upstream import FakeUpstream, Reply  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODELS = {"onnx": "all-MiniLM-L6-v2-int8", "torch": "all-MiniLM-L6-v2"}
CHAT_MODEL = "fake-model"
SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_CAPS = (500, 1000, 2000)


# -- embeddings: the real model behind a cache ---------------------------------------


class VectorCache:
    """Vectors by (model, text), in a SQLite file; safe to share between threads."""

    def __init__(self, path: Path, model_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS v (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
        self._lock = threading.Lock()

    def key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.model_id}\n{text}".encode()).digest()

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of those texts that have one."""
        keys = {self.key(t): t for t in texts}
        found: dict[str, np.ndarray] = {}
        items = list(keys)
        with self._lock:
            for start in range(0, len(items), 500):
                chunk = items[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for k, blob in self._db.execute(f"SELECT k, v FROM v WHERE k IN ({marks})", chunk):
                    found[keys[k]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, pairs: Sequence[tuple[str, np.ndarray]]) -> None:
        rows = [(self.key(t), np.asarray(v, np.float32).tobytes()) for t, v in pairs]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def make_embedder(kind: str) -> OnnxEmbedder | LocalEmbedder:
    """The local model the bench serves (one thread: the machine has two cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return OnnxEmbedder(None, threads=1) if kind == "onnx" else LocalEmbedder(None, threads=1)


class Served:
    """Counts of what the embedding server did."""

    def __init__(self) -> None:
        self.hits = 0
        self.computed = 0
        self.seconds = 0.0


def embedding_app(kind: str, cache: VectorCache, served: Served) -> Starlette:
    """An OpenAI-style ``POST /v1/embeddings`` over the real model, cached."""
    model = make_embedder(kind)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        await model.start()
        yield
        await model.close()

    async def embeddings(request: Request) -> JSONResponse:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        found = cache.get(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        served.hits += len(texts) - len(missing)
        if missing:
            started = time.perf_counter()
            rows = await model.embed(missing)
            served.seconds += time.perf_counter() - started
            served.computed += len(missing)
            pairs = list(zip(missing, rows, strict=True))
            cache.put(pairs)
            found.update(pairs)
        data = [
            {"object": "embedding", "index": i, "embedding": found[t].tolist()}
            for i, t in enumerate(texts)
        ]
        return JSONResponse({"object": "list", "data": data, "model": cache.model_id})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": cache.model_id, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def haystack_keys(question: dict[str, Any]) -> list[str]:
    """The texts the proxy's worker will embed for this haystack (its own functions)."""
    keys = []
    for turn in lme.haystack(question):
        speaker = lme.USER_NAME if turn.role == "user" else lme.CHAR_NAME
        keys += [embedding_key(piece, speaker) for piece in split_text(turn.text)]
    return keys


_PROCESS: dict[str, Any] = {}


def _prefill_init(kind: str) -> None:
    loop = asyncio.new_event_loop()
    model = make_embedder(kind)
    loop.run_until_complete(model.start())
    _PROCESS.update(loop=loop, model=model)


def _prefill_batch(texts: list[str]) -> np.ndarray:
    return _PROCESS["loop"].run_until_complete(_PROCESS["model"].embed(texts))


def prefill(
    questions: Sequence[dict[str, Any]], cache: VectorCache, kind: str, workers: int
) -> None:
    """Embed every haystack text of ``questions`` not in the cache, in processes."""
    keys = list(dict.fromkeys(k for q in questions for k in haystack_keys(q)))
    missing = [k for k in keys if k not in cache.get([k])]
    print(f"prefill: {len(keys)} texts, {len(missing)} to embed with {workers} processes")
    if not missing:
        return
    missing.sort(key=len)  # batches of similar length pad less
    batches = [missing[i : i + 32] for i in range(0, len(missing), 32)]
    started = time.perf_counter()
    done = 0
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_prefill_init, initargs=(kind,)
    ) as pool:
        for batch, rows in zip(batches, pool.map(_prefill_batch, batches), strict=True):
            cache.put(list(zip(batch, rows, strict=True)))
            done += len(batch)
            if done % 2048 < 32:
                rate = done / (time.perf_counter() - started)
                print(f"  {done}/{len(missing)} ({rate:.1f}/s)", flush=True)
    print(f"prefill: done in {time.perf_counter() - started:.0f} s", flush=True)


# -- the proxy ---------------------------------------------------------------------


def proxy_config(
    path: Path,
    *,
    port: int,
    fake_url: str,
    embed_url: str,
    model_id: str,
    db: Path,
    cap: int,
    extra: str = "",
    embeddings: str | None = None,
) -> Path:
    """A config.toml for one pass; ``embeddings`` replaces the [embeddings] section
    (default: the bench's embedding server)."""
    if embeddings is None:
        embeddings = (
            f'[embeddings]\nbackend = "upstream"\nupstream = "embed"\nmodel = "{model_id}"\n'
            "batch_size = 64\n"
        )
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
discover = false
default_upstream = "fake"

[upstreams.fake]
base_url = "{fake_url}/v1"
context_window = 16384

[upstreams.embed]
base_url = "{embed_url}/v1"

[memory]
database = "{db}"
style_sample = false

[caps]
total = {cap}
memories = {cap}

{embeddings}
[background]
llm = false

[request_log]
store_messages = false
{extra}
"""
    )
    return path


@contextlib.contextmanager
def running_proxy(config: Path, port: int, log: Path, root: Path = ROOT) -> Iterator[str]:
    """``python -m proxy start`` with this config until the block ends; ``root`` is the
    checkout whose proxy runs (another worktree, to measure an older version)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "start", "--config", str(config)],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the proxy exited ({proc.returncode}); see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the proxy did not start; see {log}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scope_name(question: dict[str, Any]) -> str:
    return f"lme-{question['question_id']}"


def import_haystack(client: httpx.Client, url: str, question: dict[str, Any]) -> dict[str, Any]:
    """Import the question's haystack into its scope and wait for its background work."""
    scope = scope_name(question)
    turns = lme.haystack(question)
    response = client.post(
        f"{url}/memory/scopes/{scope}/import/sillytavern",
        content=lme.to_sillytavern(turns).encode(),
        headers={"content-type": "application/jsonl"},
        timeout=600,
    )
    response.raise_for_status()
    result = response.json()
    wait_for_jobs(client, url, scope)
    return result


def wait_for_jobs(client: httpx.Client, url: str, scope: str, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"{url}/memory/scopes/{scope}", timeout=60).json()
        jobs = view["jobs"]
        if jobs["failed"]:
            raise RuntimeError(f"background jobs failed in {scope}: {jobs}")
        if not jobs["pending"] and not jobs["running"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{scope}: jobs still pending after {timeout} s")
        time.sleep(0.25)


def has_scope(client: httpx.Client, url: str, question: dict[str, Any]) -> bool:
    response = client.get(f"{url}/memory/scopes/{scope_name(question)}", timeout=60)
    return response.status_code == 200 and response.json()["messages"]["active"] > 0


def ask(
    client: httpx.Client,
    url: str,
    up: FakeUpstream,
    question: dict[str, Any],
    counter: TokenCounter,
) -> dict[str, Any]:
    """Ask the question; what the upstream received, scored."""
    sent = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question["question"]},
    ]
    now = lme.parse_date(question["question_date"]).isoformat()
    before = len(up.chat_requests)
    started = time.perf_counter()
    response = client.post(
        f"{url}/s/{scope_name(question)}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": sent, "stream": False},
        headers={"X-Memory-Write": "off", "X-Memory-Now": now},
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    received = up.chat_requests[before:]
    if len(received) != 1:
        raise RuntimeError(f"expected one upstream request, got {len(received)}")
    messages = received[0].json["messages"]
    originals = {json.dumps(m, sort_keys=True) for m in sent}
    added = [m for m in messages if json.dumps(m, sort_keys=True) not in originals]
    block = "\n".join(str(m.get("content") or "") for m in added)
    prompt = "\n".join(str(m.get("content") or "") for m in messages)
    return {
        "id": question["question_id"],
        "type": question["question_type"],
        "block_tokens": counter.count_text(block) if block else 0,
        "injected": int(response.headers.get("x-memory-injected", "0")),
        "error": response.headers.get("x-memory-error"),
        "ms": round(elapsed * 1000, 1),
        "score": lme.score(question, prompt),
    }


# -- added time to first byte ---------------------------------------------------------


def first_byte(
    client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, str | None]:
    """Seconds from sending a streamed chat request to its first body byte, and the
    proxy's request id (None straight to the upstream)."""
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        response.raise_for_status()
        elapsed = None
        for _ in response.iter_raw():
            if elapsed is None:
                elapsed = time.perf_counter() - started
        if elapsed is None:
            raise RuntimeError("empty response")
    return elapsed, response.headers.get("x-memory-request-id")


def step_medians(client: httpx.Client, proxy_url: str, request_ids: list[str]) -> dict[str, float]:
    """Median milliseconds of each step of the memory layer (the request log's timings)."""
    steps: dict[str, list[float]] = {}
    for request_id in request_ids:
        entry = client.get(f"{proxy_url}/memory/requests/{request_id}", timeout=60).json()
        for name, ms in entry.get("detail", entry).get("timings", {}).items():
            steps.setdefault(name, []).append(ms)
    return {name: round(float(np.median(values)), 2) for name, values in steps.items()}


def measure_ttfb(
    client: httpx.Client,
    proxy_url: str,
    fake_url: str,
    scope: str,
    queries: Sequence[dict[str, Any]],
    rounds: int,
) -> dict[str, Any]:
    """Paired TTFB: each round sends one query straight to the fake and through the
    proxy into ``scope`` (alternating which goes first); a different question each
    round, so the query embedding is never a cache hit."""
    headers = {"X-Memory-Write": "off"}
    deadline = time.monotonic() + 300
    while True:  # until the embedding model is loaded (no "warming up")
        probe = client.post(
            f"{proxy_url}/s/{scope}/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "warm up"}]},
            headers=headers,
            timeout=120,
        )
        if "x-memory-error" not in probe.headers:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the proxy's embedder did not load: {probe.headers}")
        time.sleep(1)
    direct: list[float] = []
    proxied: list[float] = []
    request_ids: list[str] = []
    for i in range(rounds):
        q = queries[i % len(queries)]
        text = q["question"] if i < len(queries) else f"{q['question']} ({i})"
        body = {
            "model": CHAT_MODEL,
            "stream": True,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": text},
            ],
        }
        now = {"X-Memory-Now": lme.parse_date(q["question_date"]).isoformat()}
        pair = [
            ("direct", f"{fake_url}/v1/chat/completions", {}),
            ("proxy", f"{proxy_url}/s/{scope}/v1/chat/completions", {**headers, **now}),
        ]
        if i % 2:
            pair.reverse()
        for name, url, h in pair:
            elapsed, request_id = first_byte(client, url, body, h)
            (direct if name == "direct" else proxied).append(elapsed)
            if name == "proxy" and request_id:
                request_ids.append(request_id)
    added = sorted(p - d for p, d in zip(proxied, direct, strict=True))

    def pct(values: list[float], p: float) -> float:
        values = sorted(values)
        return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 2)

    return {
        "rounds": rounds,
        "direct_p50_ms": pct(direct, 0.5),
        "proxy_p50_ms": pct(proxied, 0.5),
        "added_p50_ms": pct(added, 0.5),
        "added_p95_ms": pct(added, 0.95),
        "steps_p50_ms": step_medians(client, proxy_url, request_ids),
    }


# -- the run -----------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    questions = lme.load(args.data)
    ids = (
        lme.stratify(questions, args.size, seed=args.seed)
        if args.size
        else [q["question_id"] for q in questions]
    )
    if args.only:
        ids = [i for i in ids if i in set(args.only)]
    chosen = [q for q in questions if q["question_id"] in set(ids)]
    del questions
    print(f"{len(chosen)} questions (seed {args.seed}); load avg {os.getloadavg()[0]:.1f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_id = MODELS[args.model]
    cache = VectorCache(RESULTS / f"embeddings-{args.model}.sqlite", model_id)
    if args.prefill:
        prefill(chosen, cache, args.model, args.prefill)
    prepare_tiktoken_cache(RESULTS / "tiktoken")
    counter = TokenCounter(encoding_for_model(CHAT_MODEL))

    db = Path(args.db).resolve() if args.db else RESULTS / f"recall-{args.model}.db"
    if not args.keep_db:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    extra = Path(args.extra_config).read_text() if args.extra_config else ""
    served = Served()
    out: dict[str, Any] = {
        "data": str(args.data),
        "model": model_id,
        "seed": args.seed,
        "size": args.size,
        "subset": [q["question_id"] for q in chosen],
        "caps": list(args.caps),
        "extra_config": extra,
        "proxy_root": args.proxy_root,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "passes": {},
    }
    started = time.perf_counter()
    up = FakeUpstream(context_window=16384)
    up.default = Reply("ok")
    with (
        up,
        run_server(embedding_app(args.model, cache, served), log_level="error") as embed,
        httpx.Client(trust_env=False) as client,
    ):
        for number, cap in enumerate([] if args.ttfb_only else args.caps):
            port = free_port()
            config = proxy_config(
                RESULTS / f"recall-{cap}.toml",
                port=port,
                fake_url=up.url,
                embed_url=embed.url,
                model_id=model_id,
                db=db,
                cap=cap,
                extra=extra,
            )
            rows = []
            import_s = 0.0
            log = RESULTS / f"recall-proxy-{cap}.log"
            with running_proxy(config, port, log, Path(args.proxy_root or ROOT)) as url:
                for index, question in enumerate(chosen):
                    if number == 0 and not (args.keep_db and has_scope(client, url, question)):
                        t0 = time.perf_counter()
                        import_haystack(client, url, question)
                        import_s += time.perf_counter() - t0
                    rows.append(ask(client, url, up, question, counter))
                    if (index + 1) % 10 == 0:
                        print(
                            f"  cap {cap}: {index + 1}/{len(chosen)} "
                            f"({time.perf_counter() - started:.0f} s)",
                            flush=True,
                        )
            summary = lme.aggregate(rows)
            out["passes"][str(cap)] = {"summary": summary, "rows": rows, "import_s": import_s}
            print_table(cap, summary)
        if args.ttfb or args.ttfb_only:
            out["ttfb"] = run_ttfb(args, client, up, embed.url, db, chosen)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["embeddings"] = {
        "cache_hits": served.hits,
        "computed": served.computed,
        "compute_s": round(served.seconds, 1),
    }
    out["load_avg_end"] = os.getloadavg()[0]
    cache.close()
    print(
        f"total {out['seconds']:.0f} s; embeddings computed {served.computed}, "
        f"cached {served.hits}; load avg {out['load_avg_end']:.1f}"
    )
    return out


def run_ttfb(
    args: argparse.Namespace,
    client: httpx.Client,
    up: FakeUpstream,
    embed_url: str,
    db: Path,
    chosen: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The proxy with its own local embedding model (``--ttfb-backend``) over the bench
    database, cap 2000: added TTFB of question requests into the first question's scope."""
    port = free_port()
    backend = args.ttfb_backend
    # Vectors of another model would be reset: torch gets a database of its own.
    own_db = backend != "onnx" or args.model != "onnx"
    if own_db:
        db = RESULTS / f"recall-ttfb-{backend}.db"
    config = proxy_config(
        RESULTS / "recall-ttfb.toml",
        port=port,
        fake_url=up.url,
        embed_url=embed_url,
        model_id=MODELS[args.model],
        db=db,
        cap=max(args.caps or [2000]),
        embeddings=f'[embeddings]\nbackend = "{backend}"\nthreads = 1\n',
    )
    scope = scope_name(chosen[0])
    log = RESULTS / "recall-proxy-ttfb.log"
    with running_proxy(config, port, log, Path(args.proxy_root or ROOT)) as url:
        if not has_scope(client, url, chosen[0]):  # its model embeds the haystack, once
            import_haystack(client, url, chosen[0])
        wait_for_jobs(client, url, scope)
        view = client.get(f"{url}/memory/scopes/{scope}", timeout=60).json()
        result = measure_ttfb(client, url, up.url, scope, chosen, args.ttfb or 120)
    result.update(
        backend=backend,
        scope=scope,
        messages=view["messages"]["active"],
        memories=view["memories"]["active"],
        load_avg=os.getloadavg()[0],
    )
    print(
        f"\nadded TTFB ({backend}, {result['messages']} messages / {result['memories']} memories, "
        f"{result['rounds']} paired rounds): p50 {result['added_p50_ms']} ms, "
        f"p95 {result['added_p95_ms']} ms (direct p50 {result['direct_p50_ms']} ms)\n"
        f"memory steps, p50 ms: {json.dumps(result['steps_p50_ms'])}"
    )
    return result


def print_table(cap: int, summary: dict[str, dict[str, float]]) -> None:
    print(f"\nmemory block cap {cap} tokens")
    print(
        f"{'type':28} {'n':>4} {'turn_all':>9} {'turn_any':>9} {'sess_any':>9} "
        f"{'sess_all':>9} {'tokens':>7}"
    )
    order = [*lme.TYPES, "all"]
    for name in [t for t in order if t in summary]:
        s = summary[name]
        print(
            f"{name:28} {int(s['n']):>4} {s['turn_all']:>9.3f} {s['turn_any']:>9.3f} "
            f"{s['session_any']:>9.3f} {s['session_all']:>9.3f} {s['tokens']:>7.0f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="longmemeval_s_cleaned .json or .json.xz")
    parser.add_argument("--size", type=int, default=100, help="subset size (0: every question)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="only these question ids (of the subset)")
    parser.add_argument("--caps", type=int, nargs="*", default=list(DEFAULT_CAPS))
    parser.add_argument(
        "--ttfb", type=int, default=0, metavar="N", help="then measure added TTFB, N rounds"
    )
    parser.add_argument(
        "--ttfb-only",
        action="store_true",
        help="skip the recall passes: import the first question's haystack (if missing) "
        "and measure added TTFB only (--ttfb rounds, default 120)",
    )
    parser.add_argument(
        "--ttfb-backend",
        choices=["onnx", "sentence-transformers"],
        default="sentence-transformers",
        help="the proxy's own embedder for the TTFB measurement (default: the default one)",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="onnx")
    parser.add_argument(
        "--prefill",
        type=int,
        default=0,
        metavar="N",
        help="embed the subset's texts in N processes first",
    )
    parser.add_argument("--db", help="database file (default bench/results/recall-<model>.db)")
    parser.add_argument(
        "--keep-db", action="store_true", help="reuse scopes already imported into the database"
    )
    parser.add_argument("--extra-config", help="TOML appended to the proxy's config")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--proxy-root", help="run the proxy of this checkout (a git worktree of another commit)"
    )
    args = parser.parse_args(argv)
    out = run(args)
    path = (
        Path(args.json) if args.json else RESULTS / f"recall-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
