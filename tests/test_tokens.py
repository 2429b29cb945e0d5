"""Token counting works offline, from our own cache directory, with known counts."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken.load

from proxy.inject.tokens import (
    TokenCounter,
    encoding_for_model,
    prepare_tiktoken_cache,
)

URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
PINNED = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Our own cache, in force for this module; the environment is restored after."""
    with pytest.MonkeyPatch.context() as mp:
        # setenv (not delenv) so that teardown removes what prepare_tiktoken_cache sets.
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        path = tmp_path_factory.mktemp("tiktoken")
        prepare_tiktoken_cache(path)
        yield path


@pytest.fixture(scope="module")
def counter(cache_dir: Path) -> TokenCounter:
    return TokenCounter()


def offline_env(cache_dir: Path | None) -> dict[str, str]:
    """An environment where any download attempt fails fast."""
    env = {k: v for k, v in os.environ.items() if "TIKTOKEN" not in k and "PROXY" not in k}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    env["DATA_GYM_CACHE_DIR"] = str(cache_dir) if cache_dir else ""
    env["PYTHONPATH"] = str(REPO)
    return env


def test_cache_files_have_tiktokens_names_and_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    cache = tmp_path / "cache"
    prepare_tiktoken_cache(cache)

    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)
    for name, url in URLS.items():
        path = cache / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == PINNED[name]
    assert not list(cache.glob("*.tmp"))


def test_tiktoken_reads_the_cache_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    prepare_tiktoken_cache(tmp_path)

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    # tiktoken's own loader, with its own cache key and hash check.
    ranks = tiktoken.load.load_tiktoken_bpe(URLS["o200k_base"], PINNED["o200k_base"])
    assert len(ranks) == 199998


def test_prepare_is_idempotent_and_repairs_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    prepare_tiktoken_cache(tmp_path)
    good = tmp_path / hashlib.sha1(URLS["cl100k_base"].encode()).hexdigest()
    before = good.stat().st_mtime_ns
    prepare_tiktoken_cache(tmp_path)
    assert good.stat().st_mtime_ns == before

    good.write_bytes(b"truncated")
    prepare_tiktoken_cache(tmp_path)
    assert hashlib.sha256(good.read_bytes()).hexdigest() == PINNED["cl100k_base"]


def test_counting_works_offline_in_a_fresh_process(tmp_path):
    # tiktoken keeps loaded encodings process-wide, so only a fresh process proves that
    # prepare_tiktoken_cache alone makes counting work with no network.
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from proxy.inject.tokens import TokenCounter, prepare_tiktoken_cache
        prepare_tiktoken_cache(Path({str(tmp_path / "cache")!r}))
        print(TokenCounter("o200k_base").count_text("hello world"),
              TokenCounter("cl100k_base").count_text("hello world"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=offline_env(tmp_path / "empty"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]


def test_without_prepare_a_fresh_process_cannot_count(tmp_path):
    # The control for the test above: the offline environment really is offline.
    code = "import tiktoken; tiktoken.get_encoding('o200k_base')"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0


def test_known_counts(counter, cache_dir):
    assert counter.count_text("hello world") == 2
    assert counter.count_text("") == 0
    assert counter.count_text("The quick brown fox jumps over the lazy dog.") == 10
    assert TokenCounter("cl100k_base").count_text("hello world") == 2


def test_message_costs_text_plus_overhead_and_prompt_adds_reply_priming(counter):
    message = {"role": "user", "content": "hello world"}
    assert counter.count_message(message) == 2 + 4
    assert counter.count_messages([message, message]) == 2 * 6 + 3


def test_name_images_and_tool_calls_are_counted(counter):
    plain = {"role": "user", "content": "hello world"}
    named = {**plain, "name": "Alice"}
    assert counter.count_message(named) > counter.count_message(plain)

    with_image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 50_000}},
        ],
    }
    # A fixed estimate, not the size of the base64 payload.
    assert counter.count_message(with_image) == counter.count_message(plain) + 85

    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert counter.count_message(call) > 4 + 10


def test_special_token_text_is_ordinary_text(counter):
    assert counter.count_text("say <|endoftext|> now") > 3


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_pieces_count_as_their_joined_text(cache_dir, encoding):
    """`count_pieces` sums the pieces' counts only where no token can span a join, so
    its count is the joined text's whatever the pieces hold."""
    counter = TokenCounter(encoding)
    rng = random.Random(7)
    ends = ["", ".", "!", "?", ":", ")", "]", '"', "…", "—", "/", " ", "  ", "\t", "\n", "\r\n"]
    ends += ["\n\n", ".\n", "!\n\n", " \n", "/\n", "é", "日本", "42", "'s", "😀"]
    words = ["word", "Mira", "naïve", "东京", "123", "4567", "x", "'t", "-", "--", "*", "🙂"]
    for _ in range(3000):
        pieces = []
        for _ in range(rng.randint(1, 5)):
            head = rng.choice(["", " ", "/", "-", "[", "'", "\n", "*", "1", "Ä"])
            body = " ".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
            pieces.append(head + body + rng.choice(ends) + rng.choice(["", "\n", "\n\n"]))
        assert counter.count_pieces(pieces) == counter.count_text("".join(pieces)), pieces


def test_repeated_history_counts_the_same(counter):
    history = [
        {"role": "user" if i % 2 else "assistant", "content": f"message {i} " * 40}
        for i in range(50)
    ]
    first = counter.count_messages(history)
    assert counter.count_messages(history) == first
    assert counter.count_messages([dict(m) for m in history]) == first


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("openai/gpt-4.1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("llama-3.1-8b-instruct", "o200k_base"),
        ("gemma3:270m", "o200k_base"),
    ],
)
def test_encoding_for_model(model, encoding):
    assert encoding_for_model(model) == encoding


def test_unsupported_encoding_is_refused_at_construction():
    with pytest.raises(ValueError, match="unsupported encoding"):
        TokenCounter("p50k_base")
