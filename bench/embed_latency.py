"""Micro-benchmark of the embedders: load time, query latency, batch throughput.

    .venv/bin/python bench/embed_latency.py                 # torch, query, onnx; 1 and 2 threads
    .venv/bin/python bench/embed_latency.py --backends onnx --threads 1 --queries 500
    .venv/bin/python bench/embed_latency.py --backends query --threads 1   # the chat path
    .venv/bin/python bench/embed_latency.py --upstream http://127.0.0.1:8080/v1 \\
        --upstream-model all-MiniLM-L6-v2

Each (backend, threads) runs in a fresh Python process, so "load" includes importing
torch or onnxruntime, and torch's process-wide thread count cannot leak between runs.
Columns:
- load: `start()`, imports included (seconds);
- query p50/p95: one short text per `embed` call, every text distinct (nothing cached);
  backend `query` is the local model's fast 8-bit query copy (`embed_query`, what a
  chat request waits for), with 10 ms between queries, as between requests; its busy
  columns time `embed_query` too (it waits for no batch), its /s columns are its torch
  model's;
- busy p50/p95 b8, b32: the same while another task keeps embedding lists of 32
  chat turns, i.e. what a chat request pays while the background worker embeds: it
  waits for the batch in progress, so this depends on the embedder's `batch_size`
  (8: the local default; 32);
- /s b8, b32: sentences per second embedding lists of 32 chat-turn-sized texts (15-60
  words), with `batch_size` 8 and 32.
Figures are wall-clock on whatever else the machine is doing: run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

VOCABULARY = (
    "the old sailor remembered a storm near lighthouse where Mira hid silver key under "
    "floorboard tavern dragon letter rain winter market violin promise broken bridge "
    "captain garden river secret morning candle forest whisper laughed argued painted "
    "quietly finally never always tomorrow because although while"
)


def make_texts(count: int, words: tuple[int, int], seed: int) -> list[str]:
    """Distinct pseudo-sentences with a word count drawn from `words`."""
    rng = random.Random(seed)
    vocabulary = VOCABULARY.split()
    return [
        f"{i}: " + " ".join(rng.choice(vocabulary) for _ in range(rng.randint(*words))) + "."
        for i in range(count)
    ]


def build(backend: str, threads: int, args: argparse.Namespace, client: Any) -> Any:
    from proxy.memory.embed import LocalEmbedder, OnnxEmbedder, UpstreamEmbedder

    if backend == "torch":
        return LocalEmbedder(threads=threads)
    if backend == "query":
        return LocalEmbedder(threads=threads, query_cache=query_cache())
    if backend == "onnx":
        return OnnxEmbedder(threads=threads)
    return UpstreamEmbedder(args.upstream, args.api_key, args.upstream_model, client)


def query_cache() -> Path:
    """Where the proxy keeps the fast query copy (as `proxy.app` does)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("mnemoproxy", appauthor=False)) / "query-models"


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


async def measure(backend: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure for one backend and thread count (run in its own process)."""
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        return await _measure(build(backend, threads, args, client), backend, threads, args)


async def _measure(
    embedder: Any, backend: str, threads: int, args: argparse.Namespace
) -> dict[str, Any]:
    started = time.perf_counter()
    await embedder.start()
    load = time.perf_counter() - started

    queries = make_texts(args.queries + 5, (4, 12), seed=1)
    fast = backend == "query"
    if fast and not embedder.fast_queries:
        raise RuntimeError("the fast query copy could not be built or trusted (see the log)")

    async def one(text: str) -> None:
        await (embedder.embed_query(text) if fast else embedder.embed([text]))

    for text in queries[:5]:  # warm-up: first calls allocate
        await one(text)
    single = []
    for text in queries[5:]:
        if fast:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await one(text)
        single.append(time.perf_counter() - t0)

    p50, p95 = percentiles(single)
    row: dict[str, Any] = {"backend": backend, "threads": threads, "load_s": load}
    row |= {"query_p50_ms": p50, "query_p95_ms": p95}
    turns = make_texts(32 * args.batches, (15, 60), seed=2)
    for size in (8, 32):
        embedder.batch_size = size
        t0 = time.perf_counter()
        for i in range(0, len(turns), 32):
            await embedder.embed(turns[i : i + 32])
        row[f"per_s_b{size}"] = len(turns) / (time.perf_counter() - t0)
        busy = await _queries_while_busy(embedder, one, make_texts(50, (4, 12), seed=size), turns)
        row[f"busy_p50_ms_b{size}"], row[f"busy_p95_ms_b{size}"] = percentiles(busy)
    await embedder.close()
    return row


async def _queries_while_busy(
    embedder: Any, one: Callable[[str], Awaitable[None]], queries: list[str], turns: list[str]
) -> list[float]:
    stop = asyncio.Event()

    async def background() -> None:
        i = 0
        while not stop.is_set():
            await embedder.embed(turns[i : i + 32] or turns[:32])
            i = (i + 32) % len(turns)

    worker = asyncio.create_task(background())
    samples = []
    try:
        for text in queries:
            await asyncio.sleep(0.02)  # arrive at random points of a batch
            t0 = time.perf_counter()
            await one(text)
            samples.append(time.perf_counter() - t0)
    finally:
        stop.set()
        await worker
    return samples


def available(backend: str, args: argparse.Namespace) -> bool:
    """Whether a backend can run here (its packages installed, or a URL given)."""
    if backend == "upstream":
        return bool(args.upstream)
    module = {"torch": "sentence_transformers", "query": "onnxruntime", "onnx": "onnxruntime"}[
        backend
    ]
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def run_worker(backend: str, threads: int, argv: list[str]) -> dict[str, Any] | str:
    """Run one measurement in a fresh interpreter; its result, or its error text."""
    command = [sys.executable, __file__, *argv, "--worker", backend, str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any] | str], labels: list[str]) -> None:
    header = (
        f"{'backend':<9}{'threads':>8}{'load s':>8}{'query p50':>10}{'p95':>7}"
        f"{'busy b8 p50':>12}{'p95':>7}{'busy b32 p50':>13}{'p95':>7}{'/s b8':>7}{'/s b32':>7}"
    )
    print(header)
    print("-" * len(header))
    for label, row in zip(labels, rows, strict=True):
        if isinstance(row, str):
            print(f"{label:<18}failed: {row}")
            continue
        print(
            f"{row['backend']:<9}{row['threads']:>8}{row['load_s']:>8.2f}"
            f"{row['query_p50_ms']:>10.1f}{row['query_p95_ms']:>7.1f}"
            f"{row['busy_p50_ms_b8']:>12.0f}{row['busy_p95_ms_b8']:>7.0f}"
            f"{row['busy_p50_ms_b32']:>13.0f}{row['busy_p95_ms_b32']:>7.0f}"
            f"{row['per_s_b8']:>7.0f}{row['per_s_b32']:>7.0f}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "query", "onnx", "upstream"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--queries", type=int, default=200, help="single queries to time")
    parser.add_argument("--batches", type=int, default=8, help="batches of 32 to time")
    parser.add_argument("--upstream", help="an OpenAI-compatible base URL, with /v1")
    parser.add_argument("--upstream-model", default="text-embedding-3-small")
    parser.add_argument("--api-key")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "THREADS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        backend, threads = args.worker[0], int(args.worker[1])
        print(json.dumps(asyncio.run(measure(backend, threads, args))))
        return
    rows: list[dict[str, Any] | str] = []
    labels: list[str] = []
    for backend in args.backends:
        if not available(backend, args):
            print(f"(skipping {backend}: not available here)", file=sys.stderr)
            continue
        # An upstream's speed does not depend on our thread count.
        for threads in args.threads if backend != "upstream" else [1]:
            print(f"measuring {backend}, {threads} thread(s)...", file=sys.stderr, flush=True)
            rows.append(run_worker(backend, threads, argv))
            labels.append(f"{backend}/{threads}")
    print(f"{args.queries} single queries, {args.batches} lists of 32 per row; times in ms")
    print_table(rows, labels)
    if args.json:
        print(json.dumps([r for r in rows if isinstance(r, dict)], indent=2))
    print(f"(one run per row; load average at the end: {_loadavg()})")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
