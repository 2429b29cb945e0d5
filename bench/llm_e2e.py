"""End-to-end check of background LLM work against a real llama.cpp server (optional, not CI).

    # a llama-server you already run (single slot, e.g. `-np 1`):
    .venv/bin/python bench/llm_e2e.py --url http://127.0.0.1:8080/v1
    # or let the script start one:
    .venv/bin/python bench/llm_e2e.py --llama-server /path/to/llama-server --model m.gguf

See docs/background-llm.md for building llama-server and getting a small GGUF from
PyPI. It runs the real proxy in-process (uvicorn), memory on (ONNX embeddings), the
background work on the conversation's own upstream, with a small `summary_every` so
that the rolling summary has work within a short chat. Then it

1. plays a scripted chat (names, places, a change of mind), streamed, leaving
   `--think` seconds between turns, as a user reading and typing would: background
   jobs run in those pauses;
2. measures time to first byte of turns sent while the server is idle and of turns
   sent 0.3 s after the previous reply, while the extraction job of that reply is
   being generated on the same single-slot server (the job must give way);
3. waits for the queue to drain and prints what the model made of it: facts (with
   importance and sources), summary versions, insights, every job's state and error,
   and the background counters of /metrics.

A tiny model (Gemma 3 270M) checks the protocol (structured output, preemption,
fallbacks) against a server nobody here wrote; it does not judge the quality of
facts or summaries. The result is also written to bench/results/llm_e2e.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.app import build_app
from proxy.memory import jobs, records, scope_state
from proxy.memory.store import Store
from proxy.settings import load_settings
from tests.fakes.servers import run_server

RESULTS = Path(__file__).resolve().parent / "results"
SCOPE = "e2e"
TURNS = [
    "Hi Mira. I'm Tom, a carpenter from Greywater. I came about the map you sell.",
    "My sister Ana keeps the lighthouse on Vessel Rock. I promised to visit her in spring.",
    "I need the map because the old coast road was washed away in the storm.",
    "How much is it? I only have twelve silver coins and a carved wooden fox.",
    "Deal. I'll also bring you a chair next week, I build them myself.",
    "By the way, I don't live in Greywater any more, I moved to Highfold last month.",
    "Ana says the lamp of the lighthouse is failing. Do you know anyone who can fix it?",
    "I'll leave tomorrow at dawn. Which road would you take?",
    "Thank you. Remember me to your brother at the market.",
    "One last thing: I'm afraid of the sea. Don't tell Ana.",
    "Is the map waterproof? Rain is coming.",
    "Goodbye, Mira. I'll be back with the chair.",
]


def system_prompt() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are Mira, a cartographer. Answer Tom in one or two"
         " short sentences."},
        {"role": "assistant", "content": "Well met, traveler. Looking for a map?"},
    ]  # fmt: skip


# Gemma's turn format, for a GGUF without a chat template (the base model from PyPI);
# Gemma has no system role: system text goes in a user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = 'user' %}"
    "{% endif %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@contextlib.contextmanager
def llama_server(binary: str, model: str, port: int, ctx: int, threads: int) -> Iterator[str]:
    """Start llama-server with one slot (and Gemma's chat format); yield its /v1 base URL."""
    template = Path(tempfile.mkdtemp()) / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    command = [binary, "-m", model, "--port", str(port), "-c", str(ctx), "-t", str(threads)]
    command += ["-np", "1", "--jinja", "--chat-template-file", str(template)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}")
            time.sleep(0.5)
        else:
            raise TimeoutError("llama-server did not become healthy within 120 s")
        yield f"{url}/v1"
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()


def stream_turn(
    client: httpx.Client, proxy: str, messages: list[dict[str, Any]]
) -> tuple[float | None, float, str]:
    """One streamed turn: (ttfb seconds, total seconds, reply text); ttfb None and the
    error as the text when the upstream refused it."""
    body = {"model": "local", "messages": messages, "stream": True, "max_tokens": 60}
    started = time.monotonic()
    first = None
    text = []
    with client.stream(
        "POST", f"{proxy}/v1/chat/completions", json=body, headers={"x-memory-scope": SCOPE}
    ) as response:
        if response.status_code != 200:
            error = response.read().decode("utf-8", "replace")[:300]
            return None, time.monotonic() - started, f"HTTP {response.status_code}: {error}"
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                if first is None:
                    first = time.monotonic() - started
                text.append(delta)
    total = time.monotonic() - started
    return (first if first is not None else total), total, "".join(text)


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "memory.db"
        settings = load_settings(
            None,
            {
                "upstreams": {"llama": {"base_url": url, "slots": 1}},
                # Our token counts (tiktoken) are not Gemma's: keep a wider margin.
                "memory": {"enabled": True, "database": str(db), "margin_tokens": args.margin},
                "embeddings": {"backend": "onnx"},
                "background": {
                    "summary_every": args.summary_every,
                    "summary_words": 80,
                    "reflect_threshold": 2.0,
                    "timeout": args.timeout,
                    "max_tokens": args.max_tokens,
                },
            },
        )
        idle: list[float] = []
        busy: list[float] = []
        errors: list[str] = []
        history = system_prompt()
        with run_server(build_app(settings)) as proxy, httpx.Client(timeout=300) as client:
            for i, said in enumerate(TURNS[: args.turns]):
                history.append({"role": "user", "content": said})
                ttfb, total, reply = stream_turn(client, proxy.url, history)
                if ttfb is None:  # the upstream refused it: say why, go on without it
                    errors.append(reply)
                    print(f"turn {i + 1}: {reply}")
                    history.pop()
                    continue
                history.append({"role": "assistant", "content": reply})
                (busy if i and i % 2 == 0 else idle).append(ttfb)
                print(f"turn {i + 1}: ttfb {ttfb:.2f} s, total {total:.2f} s: {reply[:60]!r}")
                # Odd turns: the next one comes 0.3 s later, over the running extraction.
                time.sleep(0.3 if i % 2 == 1 else args.think)
            metrics = client.get(f"{proxy.url}/metrics").text
            store = Store.open_sync(db)
            try:
                deadline = time.monotonic() + args.drain
                while time.monotonic() < deadline and store.read_sync(jobs.queue_depth):
                    time.sleep(1)
                report = inspect(store)
                metrics = client.get(f"{proxy.url}/metrics").text
            finally:
                store.close_sync()
    report["turn_errors"] = errors
    report["ttfb_idle_s"] = _stats(idle)
    report["ttfb_over_a_running_job_s"] = _stats(busy)
    report["metrics"] = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("mnemoproxy_background_llm")
    }
    return report


def inspect(store: Store) -> dict[str, Any]:
    scope = store.read_sync(records.get_scope, "", SCOPE)
    assert scope is not None
    out: dict[str, Any] = {}
    for kind in ("fact", "insight", "summary"):
        rows = store.read_sync(
            records.list_memories, scope.id, kinds=[kind], states=("active", "superseded")
        )
        out[kind] = [
            {"text": m.text, "importance": m.importance, "state": m.state, "sources": m.sources}
            for m in reversed(rows)
        ]
    out["summaries"] = [
        {"state": s.state, "covers_until_seq": s.covers_until_seq, "text": s.text}
        for s in reversed(store.read_sync(scope_state.list_summaries, scope.id))
    ]
    out["jobs"] = [
        {"kind": j.kind, "state": j.state, "attempts": j.attempts, "error": j.last_error}
        for j in reversed(store.read_sync(jobs.list_jobs, limit=1000))
        if j.kind != "embed"
    ]
    return out


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="base URL of a running llama-server, with /v1")
    parser.add_argument("--llama-server", help="path of llama-server, to start it here")
    parser.add_argument("--model", help="GGUF file for --llama-server")
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument("--ctx", type=int, default=2048, help="context window to serve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=len(TURNS))
    parser.add_argument("--think", type=float, default=8.0, help="seconds between turns")
    parser.add_argument("--summary-every", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=300, help="of facts and insights")
    parser.add_argument("--margin", type=int, default=256, help="[memory] margin_tokens")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait for jobs")
    args = parser.parse_args()
    if args.url:
        report = run(args.url, args)
    elif args.llama_server and args.model:
        with llama_server(args.llama_server, args.model, args.port, args.ctx, args.threads) as url:
            report = run(url, args)
    else:
        parser.error("give --url, or --llama-server and --model")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llm_e2e.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
