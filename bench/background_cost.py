"""What background LLM work costs per chat turn: upstream calls and tokens, by job kind.

    .venv/bin/python bench/background_cost.py                  # 200 turns, ~1-2 minutes
    .venv/bin/python bench/background_cost.py --turns 60 --summary-every 4

It plays a long SillyTavern-style chat through the real proxy (in-process, under
uvicorn) against the fake upstream, a llama.cpp-like server with a small context
window, so that old messages leave the window and the rolling summary has work. The
fake plays the memory model too: each extraction gets one or two facts (sometimes a
repeat or an update of a known one), each summary about `summary_words` words, each
reflection two insights. User turns are ~60 words, replies ~120, sent one after the
other with `--think` seconds between them (the user reading and typing: background
work runs then; a turn that arrives while a job runs preempts it, and the tokens the
job had been sent are wasted: counted separately).

Tokens are counted with tiktoken (o200k) on what the upstream received (prompt) and
what it answered (completion). The figures are per user turn, for background work
next to the chat itself. With a real model the prompt counts are the same; the
completion counts depend on the model's verbosity.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import platformdirs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.app import build_app
from proxy.inject.tokens import TokenCounter, prepare_tiktoken_cache
from proxy.memory import jobs
from proxy.memory.store import Store
from proxy.settings import load_settings
from tests.fakes.servers import run_server
from tests.fakes.upstream import FakeUpstream, Reply

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = " ".join(
    [
        "river road lantern map harbour storm ferry orchard bridge tower market letter",
        "promise sister brother captain garden winter summer island boat mountain pass",
        "bread oven candle song sword ring key door window forest wolf fox owl",
    ]
).split()
PLACES = ["Vessel Rock", "Greywater", "the Old Mill", "Highfold", "the harbour", "Ashby"]


def sentence(rng: random.Random, words: int) -> str:
    """A chat-like text of about `words` words."""
    out = [rng.choice(WORDS) for _ in range(words)]
    for i in range(9, len(out), 10):
        out[i] += "."
    return " ".join(out).capitalize() + "."


class Scripted:
    """The fake's answers: chat replies for users, JSON for the memory model."""

    def __init__(self, seed: int, summary_words: int) -> None:
        self.rng = random.Random(seed)
        self.summary_words = summary_words
        self.lock = threading.Lock()
        self.completions: dict[int, str] = {}  # id(body) -> what was answered
        self.facts = itertools.count(1)

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self.lock:
            text = self._answer(body)
            self.completions[id(body)] = text
        return Reply(text)

    def _answer(self, body: dict[str, Any]) -> str:
        kind = job_kind(body)
        rng = self.rng
        if kind is None:
            return sentence(rng, 120)
        prompt = "\n".join(str(m.get("content", "")) for m in body["messages"])
        if kind == "facts":
            known = re.findall(r"^(K\d+)\. ", prompt, re.MULTILINE)
            facts = []
            for _ in range(rng.choice((1, 1, 2))):
                n = next(self.facts)
                fact = {
                    "text": f"Tom {rng.choice(WORDS)}s the {rng.choice(WORDS)} at "
                    f"{rng.choice(PLACES)} (fact {n}).",
                    "importance": round(rng.uniform(0.2, 0.9), 2),
                    "from": [1],
                    "same_as": None,
                    "updates": None,
                }
                roll = rng.random()
                if known and roll < 0.1:
                    fact["same_as"] = rng.choice(known)
                elif known and roll < 0.2:
                    fact["updates"] = rng.choice(known)
                facts.append(fact)
            return json.dumps({"facts": facts})
        if kind == "summary":
            return json.dumps({"summary": sentence(rng, self.summary_words)})
        return json.dumps(
            {
                "insights": [
                    {"text": sentence(rng, 15), "importance": 0.7, "because": ["F1", "F2"]},
                    {"text": sentence(rng, 15), "importance": 0.6, "because": ["F3"]},
                ]
            }
        )


def job_kind(body: dict[str, Any]) -> str | None:
    """facts / summary / insights for background requests (by their schema), else None."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
        return rf["json_schema"].get("name")
    return None


def st_body(history: list[tuple[str, str]]) -> dict[str, Any]:
    """A SillyTavern request body for the history so far."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Write Mira's next reply in a chat between Mira and Tom."},
        {"role": "assistant", "content": "*Mira looks up from the map.* Well met, traveler."},
    ]
    messages += [{"role": r, "content": t} for r, t in history]
    return {"model": "fake-model", "messages": messages, "max_tokens": 300, "stream": False}


def run(args: argparse.Namespace) -> dict[str, Any]:
    prepare_tiktoken_cache(
        Path(platformdirs.user_cache_dir("mnemoproxy", appauthor=False)) / "tiktoken"
    )
    counter = TokenCounter("o200k_base")
    scripted = Scripted(args.seed, args.summary_words)
    rng = random.Random(args.seed + 1)
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeUpstream(flavor="llamacpp", context_window=args.window) as up,
    ):
        up.responder = scripted
        db = Path(tmp) / "memory.db"
        settings = load_settings(
            None,
            {
                "upstreams": {"local": {"base_url": up.base_url}},
                "memory": {"enabled": True, "database": str(db)},
                "embeddings": {"backend": "upstream", "upstream": "local", "model": "fake"},
                "background": {
                    "summary_every": args.summary_every,
                    "summary_words": args.summary_words,
                    "reflect_threshold": args.reflect_threshold,
                },
            },
        )
        started = time.monotonic()
        with run_server(build_app(settings)) as proxy:
            history: list[tuple[str, str]] = []
            with httpx.Client(timeout=60) as client:
                for _ in range(args.turns):
                    history.append(("user", sentence(rng, 60)))
                    response = client.post(
                        f"{proxy.url}/v1/chat/completions",
                        json=st_body(history),
                        headers={"x-memory-scope": "bench"},
                    )
                    response.raise_for_status()
                    history.append(
                        ("assistant", response.json()["choices"][0]["message"]["content"])
                    )
                    time.sleep(args.think)
            store = Store.open_sync(db)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    depth = store.read_sync(jobs.queue_depth)
                    if not depth:
                        break
                    time.sleep(0.2)
                states = Counter(
                    (j.kind, j.state) for j in store.read_sync(jobs.list_jobs, limit=100_000)
                )
            finally:
                store.close_sync()
        elapsed = time.monotonic() - started
        requests = up.chat_requests
        disconnected = {id(r) for r in up.disconnects}

    totals: dict[str, Counter[str]] = defaultdict(Counter)
    for request in requests:
        body = request.json
        kind = job_kind(body) or "chat (the user's own)"
        prompt = counter.count_messages(body["messages"])
        totals[kind]["calls"] += 1
        if id(request) in disconnected:
            totals[kind]["preempted"] += 1
            totals[kind]["wasted_prompt_tokens"] += prompt
            continue
        totals[kind]["prompt_tokens"] += prompt
        answer = scripted.completions.get(id(body), "")
        totals[kind]["completion_tokens"] += counter.count_text(answer)
    turns = args.turns
    table = {
        kind: {
            "calls": c["calls"],
            "calls_per_turn": round(c["calls"] / turns, 3),
            "prompt_tokens_per_turn": round(c["prompt_tokens"] / turns, 1),
            "completion_tokens_per_turn": round(c["completion_tokens"] / turns, 1),
            "preempted": c["preempted"],
            "wasted_prompt_tokens_per_turn": round(c["wasted_prompt_tokens"] / turns, 1),
        }
        for kind, c in sorted(totals.items())
    }
    background = [k for k in totals if not k.startswith("chat")]
    chat = totals["chat (the user's own)"]
    bg_prompt = sum(
        totals[k]["prompt_tokens"] + totals[k]["wasted_prompt_tokens"] for k in background
    )
    bg_completion = sum(totals[k]["completion_tokens"] for k in background)
    return {
        "turns": turns,
        "window": args.window,
        "summary_every": args.summary_every,
        "summary_words": args.summary_words,
        "reflect_threshold": args.reflect_threshold,
        "think_seconds": args.think,
        "seconds": round(elapsed, 1),
        "by_kind": table,
        "background_per_turn": {
            "calls": round(sum(totals[k]["calls"] for k in background) / turns, 3),
            "prompt_tokens": round(bg_prompt / turns, 1),
            "completion_tokens": round(bg_completion / turns, 1),
        },
        "background_vs_chat_prompt_tokens": round(bg_prompt / max(1, chat["prompt_tokens"]), 3),
        "jobs": {f"{kind}/{state}": n for (kind, state), n in sorted(states.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--window", type=int, default=4096, help="the upstream's context window")
    parser.add_argument("--summary-every", type=int, default=8)
    parser.add_argument("--summary-words", type=int, default=250)
    parser.add_argument("--reflect-threshold", type=float, default=5.0)
    parser.add_argument("--think", type=float, default=0.2, help="seconds between turns")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = run(args)
    print(f"{args.turns} turns in {result['seconds']} s; per user turn:")
    print(f"{'kind':<24}{'calls':>8}{'prompt tok':>12}{'compl. tok':>12}{'preempted':>11}")
    for kind, row in result["by_kind"].items():
        print(
            f"{kind:<24}{row['calls_per_turn']:>8.2f}{row['prompt_tokens_per_turn']:>12.0f}"
            f"{row['completion_tokens_per_turn']:>12.0f}{row['preempted']:>11}"
        )
    bg = result["background_per_turn"]
    print(
        f"background total: {bg['calls']:.2f} calls, {bg['prompt_tokens']:.0f} prompt + "
        f"{bg['completion_tokens']:.0f} completion tokens per turn "
        f"({result['background_vs_chat_prompt_tokens']:.2f}x the chat's prompt tokens)"
    )
    print("jobs:", result["jobs"])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "background_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
