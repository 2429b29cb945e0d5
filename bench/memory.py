"""Benchmark of memory on the request path (issue #3).

    .venv/bin/python bench/memory.py                        # all three parts
    .venv/bin/python bench/memory.py --sizes 10000 --requests 100 --skip-tokens
    .venv/bin/python bench/memory.py --floor --skip-tokens --skip-embedding
    .venv/bin/python bench/memory.py --write --sizes 10000 --skip-tokens --skip-embedding
    git worktree add /tmp/before HEAD~3
    .venv/bin/python bench/memory.py --compare /tmp/before --skip-tokens --skip-embedding

(a) Added time to first byte with memory on, against the same request sent straight
    to the upstream, paired request by request, for a scope holding N memories
    (10k and 100k by default). The requests are SillyTavern-shaped (system prompts, a
    greeting, 20 turns of history), each with a new last user message, so every one
    pays a real query embedding; `X-Memory-Write: off` keeps the scope at N. With
    `--write` each turn is stored instead, as in a chat (the scope grows by two
    memories a request, and the next request finds the scope's vectors changed). With
    `--floor`, two more proxies are timed in the same rounds: memory with recall off
    (no query embedding, no search) and memory off; their added times are what a
    request costs besides recall. Each line also shows the p50 of the memory layer's
    steps, read back from the request log. `--compare CHECKOUT` times the proxy of
    another checkout beside this one in the same way (before/after a change).
(b) Upstream prompt tokens against the full history, for a long chat played turn by
    turn through the proxy with an 8k context window (tokens saved).
(c) Background embedding throughput: turns imported at once, timed until the worker
    has embedded them all.

The scope's memories are built straight into the database file (cached under
bench/results/, git-ignored) with vectors made from real all-MiniLM-L6-v2 vectors of a
varied corpus (plus noise beyond the corpus size: latency does not depend on it).
Every server is its own process: the fake upstream (tests/fakes/upstream.py), the
proxy (`python -m proxy start`). Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.memory import records, vectors  # noqa: E402
from proxy.memory.embed import ONNX_INT8_MODEL_ID  # noqa: E402
from proxy.memory.record import new_message, store_messages  # noqa: E402
from proxy.memory.store import Store  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The fake upstream's reply (tests/fakes/upstream.py's default text), as the app shows it.
FAKE_REPLY = "Hello from the fake upstream."
# Seconds after each round of --write for the background embedding of the turn.
WRITE_GAP = 0.3
MODEL_ID = "all-MiniLM-L6-v2"


def _knn_module() -> Any:
    """bench/knn.py, for its corpus of real sentence vectors (cached on disk)."""
    spec = importlib.util.spec_from_file_location("bench_knn", ROOT / "bench" / "knn.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


@contextmanager
def fake_upstream(window: int) -> Iterator[str]:
    """The fake upstream as its own process (llama.cpp flavour: it reports n_ctx)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.upstream",
            "--port",
            str(port),
            "--chunks",
            "20",
            "--flavor",
            "llamacpp",
            "--context-window",
            str(window),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def proxy(
    upstream: str,
    db: Path,
    backend: str,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> Iterator[str]:
    """`mnemoproxy start` of the checkout at `root` with memory on, over `db`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOPROXY_")}
    env.update(
        {
            "MNEMOPROXY_MEMORY__DATABASE": str(db),
            "MNEMOPROXY_EMBEDDINGS__BACKEND": backend,
            "MNEMOPROXY_SERVER__LOG_LEVEL": "warning",
            **(extra_env or {}),
        }
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "start",
            "--port",
            str(port),
            "--upstream",
            f"local={upstream}",
        ],
        cwd=root,  # `-m proxy` imports the package of the working directory
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", process)
        yield url
    finally:
        process.terminate()
        process.wait(20)


# -- requests -----------------------------------------------------------------------


def st_body(history: list[tuple[str, str]], question: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {
            "role": "system",
            "content": "Write Mira's next reply in a fictional chat between Mira and Tom.",
        },
        {"role": "system", "content": "[Mira is a cartographer with a dry wit.]"},
        {"role": "system", "content": "[Start a new Chat]"},
        {"role": "assistant", "content": "*Mira looks up from the map.* Well met, traveler."},
    ]
    messages += [{"role": r, "content": t} for r, t in history]
    messages.append({"role": "user", "content": question})
    return {"model": "fake-model", "messages": messages, "stream": True, "max_tokens": 300}


def ttfb(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    response_headers: dict[str, str] | None = None,
) -> float:
    """Seconds until the first SSE data line, on a new connection (as SillyTavern does);
    the response's headers go into `response_headers` when given."""
    with httpx.Client(timeout=60) as client:
        # The clock starts after the client is built (its SSL context alone takes ms).
        started = time.perf_counter()
        with client.stream(
            "POST", url, json=body, headers={"Connection": "close", **headers}
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.read()[:300]!r}")
            lines = response.iter_lines()  # one iterator: httpx streams a body only once
            for line in lines:
                if line.startswith("data: "):
                    first = time.perf_counter() - started
                    break
            else:
                raise RuntimeError("no data event")
            for _ in lines:
                pass
    if "x-memory-error" in response.headers:
        raise RuntimeError(f"memory error: {response.headers['x-memory-error']}")
    if response_headers is not None:
        response_headers.update(response.headers)
    return first


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat, Linux), to tell the CPU stolen by
    the hypervisor during a run: on a shared virtual machine that is what makes one run
    slower than another."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_fraction(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time stolen between two `cpu_times` readings (field 8: steal)."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    deltas = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(deltas[:8])  # user .. steal; guest time is counted inside user
    return deltas[7] / total if total > 0 else None


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- (a) added time to first byte ------------------------------------------------------


def build_scope_db(path: Path, size: int) -> None:
    """A database whose scope `bench` holds `size` embedded turn memories."""
    if path.exists():
        return
    knn = _knn_module()
    texts, base = knn.real_vectors(min(size, 5000))
    rng = np.random.default_rng(7)
    tmp = path.with_suffix(".building")
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    store = Store.open_sync(tmp)
    try:
        scope = store.write_sync(records.get_or_create_scope, "", "bench", "Mira", time.time())
        start = time.time() - size * 60.0
        batch = 5000
        for offset in range(0, size, batch):
            count = min(batch, size - offset)
            rows = [
                new_message(
                    {
                        "role": "user" if (offset + i) % 2 == 0 else "assistant",
                        "content": f"{texts[(offset + i) % len(texts)]} (#{offset + i})",
                    },
                    seen_at=start + (offset + i) * 60.0,
                    char="Mira",
                    user="Tom",
                )
                for i in range(count)
            ]
            _, memory_ids = store.write_sync(
                store_messages, scope.id, rows, thread=1, request_id=None, now=time.time()
            )
            index = np.arange(offset, offset + count) % len(base)
            noisy = base[index] + rng.normal(0, 0.02, (count, base.shape[1])).astype(np.float32)
            store.write_sync(
                vectors.store_vectors, MODEL_ID, list(zip(memory_ids, noisy, strict=True))
            )
            store.write_sync(lambda conn: conn.execute("UPDATE jobs SET state = 'done'"))
            print(f"  built {offset + count}/{size} memories", file=sys.stderr)
    finally:
        store.close_sync()
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(tmp) + suffix)
        if src.exists():
            src.rename(Path(str(path) + suffix))


def labelled_copy(db: Path, backend: str, name: str = "run") -> Path:
    """A copy of `db` whose vectors are labelled with `backend`'s model id.

    The proxy re-embeds every memory when the store's model id is not its embedder's
    (the onnx backend has an id of its own): that background work would compete with
    the measured requests. The vectors are MiniLM's either way (the int8 export's are
    within cosine 0.9995 of them), so only the label changes; latency does not depend
    on it. The copy is remade for every run, so a run never changes the cached file.
    """
    model_id = {"onnx": ONNX_INT8_MODEL_ID}.get(backend, MODEL_ID)
    copy = db.with_name(f"{db.stem}-{name}.db")
    for suffix in ("", "-wal", "-shm"):
        Path(str(copy) + suffix).unlink(missing_ok=True)
    source = sqlite3.connect(db)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)
        target.execute("UPDATE meta SET value = ? WHERE key = 'embedding_model'", (model_id,))
        target.commit()
    finally:
        source.close()
        target.close()
    return copy


class Variant(NamedTuple):
    """One proxy that (a) times: its name, its settings, and the checkout it runs."""

    name: str
    env: dict[str, str]
    root: Path = ROOT


# What (a) can compare, each a proxy of its own over its own copy of the scope: the
# whole memory layer, the memory layer with recall off (no query embedding, no search:
# what a request costs besides recall), and the proxy with memory off.
MEMORY = Variant("memory", {})
FLOOR = (
    Variant("memory, recall off", {"MNEMOPROXY_RECALL__LIMIT": "0"}),
    Variant("proxy only", {"MNEMOPROXY_MEMORY__ENABLED": "false"}),
)
# The memory layer's step timings reported from the request log (p50 of each).
STEPS = (
    "scope_ms",
    "transcript_ms",
    "budget_ms",
    "embed_ms",
    "embed_wait_ms",
    "recall_ms",
    "search_ms",
    "rows_ms",
    "rank_ms",
    "compose_ms",
    "prepare_ms",
)


def measure_overhead(
    upstream: str,
    db: Path,
    backend: str,
    requests: int,
    pause: float = 0.0,
    variants: Sequence[Variant] = (MEMORY,),
    write: bool = False,
) -> dict[str, dict[str, Any]]:
    """Added time to first byte of each variant, by variant name.

    With `write`, every request's turn is stored, as in a chat: the history grows by
    each question and its reply, and each round ends with `WRITE_GAP` seconds for the
    background embedding of the turn (a user takes longer to write the next message).

    Every round sends the same new question to each variant in a shuffled order, each
    paired with the same request sent straight to the upstream just before, so that
    the variants share whatever else the machine is doing. The step timings of the
    memory layer come from the request log, read outside the timed requests.
    """
    history = [
        ("user" if i % 2 == 0 else "assistant", f"Turn {i}: we follow the river road north.")
        for i in range(20)
    ]
    rng = random.Random(3)
    words = [
        "lighthouse",
        "sister",
        "archive",
        "comet",
        "observatory",
        "harbor",
        "lantern",
        "promise",
        "bridge",
        "winter",
    ]
    headers = (
        {"X-Memory-Scope": "bench"}
        if write
        else {
            "X-Memory-Scope": "bench",
            "X-Memory-Write": "off",
        }
    )
    with contextlib.ExitStack() as stack:
        urls = {}
        for i, variant in enumerate(variants):
            copy = labelled_copy(db, backend, f"run{i}")
            urls[variant.name] = stack.enter_context(
                proxy(upstream, copy, backend, variant.env, variant.root)
            )
        for url in urls.values():
            # Warm up: the model loads in the background; wait until recall uses it.
            deadline = time.monotonic() + 180
            while True:
                try:
                    ttfb(f"{url}/v1/chat/completions", st_body(history, "warm up"), headers)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            for i in range(10):
                ttfb(f"{url}/v1/chat/completions", st_body(history, f"warm {i}"), headers)
        names = [variant.name for variant in variants]
        direct: dict[str, list[float]] = {name: [] for name in names}
        through: dict[str, list[float]] = {name: [] for name in names}
        steps: dict[str, dict[str, list[float]]] = {name: {} for name in names}
        for i in range(requests):
            question = f"Do you remember the {rng.choice(words)} and the {rng.choice(words)}? ({i})"
            body = st_body(history, question)
            order = list(names)
            rng.shuffle(order)
            for name in order:
                time.sleep(pause)  # a chat's requests come seconds apart; 0: back to back
                direct[name].append(ttfb(f"{upstream}/chat/completions", body, {}))
                time.sleep(pause)
                seen: dict[str, str] = {}
                url = f"{urls[name]}/v1/chat/completions"
                through[name].append(ttfb(url, body, headers, seen))
                if "x-memory-request-id" in seen:
                    entry = httpx.get(
                        f"{urls[name]}/memory/requests/{seen['x-memory-request-id']}", timeout=60
                    ).json()
                    for step, ms in entry.get("detail", entry).get("timings", {}).items():
                        steps[name].setdefault(step, []).append(ms)
            if write:  # the app shows the reply, the user reads it and writes the next one
                history += [("user", question), ("assistant", FAKE_REPLY)]
                time.sleep(WRITE_GAP)
    ms = 1000.0
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        added = [p - d for p, d in zip(through[name], direct[name], strict=True)]
        out[name] = {
            "direct_p50_ms": pct(direct[name], 0.5) * ms,
            "direct_p95_ms": pct(direct[name], 0.95) * ms,
            "proxy_p50_ms": pct(through[name], 0.5) * ms,
            "proxy_p95_ms": pct(through[name], 0.95) * ms,
            "added_p50_ms": pct(added, 0.5) * ms,
            "added_p95_ms": pct(added, 0.95) * ms,
            "requests": requests,
            "steps_p50_ms": {k: pct(v, 0.5) for k, v in steps[name].items() if k in STEPS},
        }
    return out


# -- (b) tokens saved -------------------------------------------------------------------


def measure_tokens(upstream: str, db: Path, backend: str, turns: int) -> dict[str, float]:
    rng = random.Random(5)
    topics = ["the river", "the old map", "the storm", "the market", "the harbor", "the letters"]
    history: list[tuple[str, str]] = []
    original = sent = 0
    with proxy(upstream, db, backend) as url, httpx.Client(timeout=60) as client:
        for i in range(turns):
            question = (
                f"Turn {i}: tell me more about {rng.choice(topics)} "
                + "and what it means " * rng.randint(1, 8)
            )
            response = client.post(
                f"{url}/v1/chat/completions",
                json={**st_body(history, question), "stream": False},
                headers={"X-Memory-Scope": "tokens"},
            )
            response.raise_for_status()
            tokens_sent = int(response.headers["x-memory-prompt-tokens"])
            sent += tokens_sent
            original += tokens_sent + int(response.headers["x-memory-tokens-saved"])
            history += [
                ("user", question),
                ("assistant", response.json()["choices"][0]["message"]["content"]),
            ]
    return {
        "turns": turns,
        "full_history_tokens_total": original,
        "sent_tokens_total": sent,
        "saved_fraction": 1 - sent / original if original else 0.0,
        "last_request_full_tokens": tokens_sent + int(response.headers["x-memory-tokens-saved"]),
        "last_request_sent_tokens": tokens_sent,
    }


# -- (c) embedding throughput ----------------------------------------------------------


def measure_embedding(upstream: str, db: Path, backend: str, turns: int) -> dict[str, float]:
    knn = _knn_module()
    texts, _ = knn.real_vectors(min(turns, 5000))
    header = json.dumps({"user_name": "Tom", "character_name": "Mira"})
    lines = [header] + [
        json.dumps(
            {
                "name": "Tom" if i % 2 == 0 else "Mira",
                "is_user": i % 2 == 0,
                "is_system": False,
                "send_date": 1_700_000_000_000 + i * 60_000,
                "mes": texts[i % len(texts)],
            }
        )
        for i in range(turns)
    ]
    with proxy(upstream, db, backend) as url, httpx.Client(timeout=300) as client:
        # Wait until the embedder is ready (a request without X-Memory-Error).
        deadline = time.monotonic() + 180
        while (
            "x-memory-error"
            in client.post(
                f"{url}/v1/chat/completions",
                json={**st_body([], "ready?"), "stream": False},
                headers={"X-Memory-Scope": "probe", "X-Memory-Write": "off"},
            ).headers
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the embedder did not get ready")
            time.sleep(0.5)
        started = time.perf_counter()
        response = client.post(
            f"{url}/memory/scopes/embed-bench/import/sillytavern",
            content="\n".join(lines).encode(),
            headers={"content-type": "application/x-ndjson"},
        )
        response.raise_for_status()
        store = Store.open_sync(db)
        try:
            while True:
                left = store.read_sync(
                    lambda c: c.execute(
                        "SELECT count(*) FROM memories WHERE embedded = 0 AND state = 'active'"
                    ).fetchone()[0]
                )
                if left == 0:
                    break
                time.sleep(0.2)
        finally:
            store.close_sync()
        elapsed = time.perf_counter() - started
    return {"turns": turns, "seconds": elapsed, "turns_per_s": turns / elapsed}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="memories in the scope for (a)")
    parser.add_argument("--requests", type=int, default=200, help="paired requests per size")
    parser.add_argument("--backend", default="sentence-transformers", help="embedding backend")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds of quiet before each request of (a) (0: back to back, where a request "
        "shares the CPU with the recording of the one before)",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="(a) stores every request's turn, as a chat does (the history grows; the turn "
        f"is embedded in the {WRITE_GAP} s after each round), instead of X-Memory-Write: off",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="(a) also times, interleaved, the memory layer with recall off and the proxy "
        "with memory off: what a request costs besides recall",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="CHECKOUT",
        help="(a) also times, interleaved, the proxy of another checkout (a git worktree "
        "of an older commit, say) with memory on",
    )
    parser.add_argument("--token-turns", type=int, default=200, help="turns of the chat in (b)")
    parser.add_argument("--embed-turns", type=int, default=1000, help="turns imported in (c)")
    parser.add_argument("--skip-tokens", action="store_true")
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"backend": args.backend, "overhead": {}}
    with fake_upstream(window=8192) as upstream:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            db = RESULTS / f"memory-bench-{size}.db"
            build_scope_db(db, size)
            variants = [MEMORY, *(FLOOR if args.floor else ())]
            if args.compare:
                root = args.compare.resolve()
                variants.append(Variant(f"memory ({root.name})", {}, root))
            before = cpu_times()
            results["overhead"][size] = measure_overhead(
                upstream, db, args.backend, args.requests, args.pause, variants, args.write
            )
            stolen = steal_fraction(before, cpu_times())
            for r in results["overhead"][size].values():
                r["cpu_steal"] = stolen
            print(f"(a) {size} memories: {json.dumps(results['overhead'][size])}", file=sys.stderr)
        scratch = RESULTS / "memory-bench-scratch.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(scratch) + suffix).unlink(missing_ok=True)
        if not args.skip_tokens:
            results["tokens"] = measure_tokens(upstream, scratch, args.backend, args.token_turns)
        if not args.skip_embedding:
            results["embedding"] = measure_embedding(
                upstream, scratch, args.backend, args.embed_turns
            )
    print()
    print(f"memory on the request path (backend: {args.backend})")
    print("memories  variant              direct p50/p95 ms   proxy p50/p95 ms   added p50/p95 ms")
    for size, by_variant in results["overhead"].items():
        for name, r in by_variant.items():
            print(
                f"{size:>8}  {name:<19}  {r['direct_p50_ms']:7.1f} /{r['direct_p95_ms']:6.1f}   "
                f"{r['proxy_p50_ms']:7.1f} /{r['proxy_p95_ms']:6.1f}   "
                f"{r['added_p50_ms']:7.1f} /{r['added_p95_ms']:6.1f}"
            )
            if r["cpu_steal"] is not None:
                stolen = f"{100 * r['cpu_steal']:.0f}%"
                print(f"{'':>8}  {'':<19}  CPU stolen by the hypervisor: {stolen}")
            if r["steps_p50_ms"]:
                steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps_p50_ms"].items())
                print(f"{'':>8}  {'':<19}  steps (p50): {steps}")
    if "tokens" in results:
        t = results["tokens"]
        print(
            f"tokens: {t['turns']} turns, full history {t['full_history_tokens_total']} tokens "
            "in all, "
            f"sent {t['sent_tokens_total']} ({100 * t['saved_fraction']:.0f}% saved); last request "
            f"{t['last_request_sent_tokens']} of {t['last_request_full_tokens']}"
        )
    if "embedding" in results:
        e = results["embedding"]
        print(
            f"background embedding: {e['turns']} turns in {e['seconds']:.1f} s"
            f" = {e['turns_per_s']:.0f} turns/s"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
