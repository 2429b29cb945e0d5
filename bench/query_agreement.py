"""How faithful the fast query copy is to the model it copies (issue #3).

    .venv/bin/python bench/query_agreement.py DATA.json.xz               # 20 haystacks
    .venv/bin/python bench/query_agreement.py DATA.json.xz --questions 5 --queries 200

Chat queries are embedded by a fast 8-bit copy of the local model
(`proxy.memory.query_model`), the stored memories by the model itself on torch. This
measures what that costs recall, on real chat text: the turns of `--questions`
LongMemEval haystacks (a seeded sample) are pooled and embedded with torch, as the
store does (each turn whole, up to the model's 256 tokens); then `--queries` of the
pool's user turns, and the sampled questions, are embedded both ways: with torch
(`embed`) and as a chat request does (`embed_query` on the fast copy). Reported:

- the cosine between the two vectors of each query (min, 1st percentile, median);
- top-10 agreement: the share of the 10 pool turns nearest to the torch vector (the
  query's own turn left out) that are also among the 10 nearest to the fast one;
- top-1: how often the nearest turn is the same.

The torch vectors of the pool are cached under bench/results/ (git-ignored): they
take ~3 CPU-minutes for 10 haystacks here. The fast copy is built as the proxy builds
it, in a temporary cache directory (~10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.longmemeval import haystack, load  # noqa: E402
from proxy.memory.embed import LocalEmbedder  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TOP = 10


def sample(
    data: str, questions: int, queries: int, seed: int
) -> tuple[list[str], list[int], list[str]]:
    """The pool's texts, the positions of the user turns used as queries, and the
    sampled questions."""
    rng = random.Random(seed)
    chosen = rng.sample(load(data), questions)
    pool = [turn for q in chosen for turn in haystack(q)]
    users = [i for i, turn in enumerate(pool) if turn.role == "user"]
    return (
        [turn.text for turn in pool],
        sorted(rng.sample(users, min(queries, len(users)))),
        [q["question"] for q in chosen],
    )


async def pool_vectors(embedder: LocalEmbedder, texts: list[str]) -> np.ndarray:
    """Torch vectors of the pool, cached by the texts and the model."""
    key = hashlib.sha256(json.dumps([embedder.model_id, texts]).encode()).hexdigest()[:16]
    cached = RESULTS / f"agreement-pool-{key}.npy"
    if cached.is_file():
        return np.load(cached)
    vectors = np.asarray(await embedder.embed(texts), dtype=np.float32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(cached, vectors)
    return vectors


async def query_vectors(embedder: LocalEmbedder, texts: list[str]) -> np.ndarray:
    """One `embed_query` per text, as chat requests make them."""
    return np.stack([await embedder.embed_query(text) for text in texts])


def agreement(
    pool: np.ndarray, exact: np.ndarray, fast: np.ndarray, own: list[int | None]
) -> dict[str, float]:
    """Cosines between the two vectors of each query, and how their top-10 agree."""
    cosines = np.sum(exact * fast, axis=1)
    overlap, same = [], []
    for i, position in enumerate(own):
        a, b = pool @ exact[i], pool @ fast[i]
        if position is not None:  # the query's own turn is not a result
            a[position] = b[position] = -np.inf
        top_a, top_b = np.argsort(-a)[:TOP], np.argsort(-b)[:TOP]
        overlap.append(len(set(top_a) & set(top_b)) / TOP)
        same.append(top_a[0] == top_b[0])
    return {
        "queries": len(own),
        "cosine_min": float(cosines.min()),
        "cosine_p1": float(np.percentile(cosines, 1)),
        "cosine_median": float(np.median(cosines)),
        "top10_agreement": float(np.mean(overlap)),
        "top1_same": float(np.mean(same)),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    texts, users, questions = sample(args.data, args.questions, args.queries, args.seed)
    torch_embedder = LocalEmbedder()
    with tempfile.TemporaryDirectory() as cache:
        fast_embedder = LocalEmbedder(query_cache=Path(cache))
        await asyncio.gather(torch_embedder.start(), fast_embedder.start())
        try:
            if not fast_embedder.fast_queries:
                raise SystemExit("the fast query copy could not be built (see the log)")
            pool = await pool_vectors(torch_embedder, texts)
            out: dict[str, Any] = {"pool": len(texts)}
            for name, queries, own in (
                ("user turns", [texts[i] for i in users], list(users)),
                ("questions", questions, [None] * len(questions)),
            ):
                exact = np.asarray(await torch_embedder.embed(queries), dtype=np.float32)
                fast = await query_vectors(fast_embedder, queries)
                out[name] = agreement(pool, exact, fast, own)
        finally:
            await asyncio.gather(torch_embedder.close(), fast_embedder.close())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a LongMemEval file (.json or .json.xz)")
    parser.add_argument("--questions", type=int, default=20, help="haystacks pooled")
    parser.add_argument("--queries", type=int, default=500, help="user turns used as queries")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    print(f"pool: {out['pool']} turns of {args.questions} haystacks (torch vectors)")
    print(f"{'queries':12s} {'n':>4s}  cosine min / p1 / median    top-10 agreement   top-1 same")
    for name in ("user turns", "questions"):
        r = out[name]
        print(
            f"{name:12s} {r['queries']:4d}  {r['cosine_min']:.4f} / {r['cosine_p1']:.4f} /"
            f" {r['cosine_median']:.4f}    {r['top10_agreement']:7.1%}"
            f"            {r['top1_same']:6.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
