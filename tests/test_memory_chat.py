"""Memory on the request path, driven like SillyTavern drives it, asserting what the
upstream received: trimmed to budget, the relevant old turn injected, the undone reply
not injected, the style sample present, the last user message intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.inject.tokens import TokenCounter
from proxy.memory import records, vectors
from proxy.memory.recall import scope_context
from tests.conftest import MakeProxy
from tests.fakes.servers import RunningServer
from tests.fakes.upstream import FakeUpstream, Reply
from tests.memory_helpers import (
    GREETING,
    MAIN_PROMPT,
    filler,
    memory_block,
    open_store,
    st_body,
    transcript_of,
    wait_until,
)
from tests.test_cli import free_port

WINDOW = 2048
MAX_TOKENS = 256
MARGIN = 128


@pytest.fixture
def llama() -> Any:
    """A llama.cpp-like upstream that reports a small context window at /props."""
    with FakeUpstream(flavor="llamacpp", context_window=WINDOW) as up:
        yield up


def memory_proxy(make_proxy: MakeProxy, up: FakeUpstream, tmp_path: Path, **sections: Any):
    sections.setdefault(
        "embeddings", {"backend": "upstream", "upstream": "local", "model": "fake-model"}
    )
    memory = {"enabled": True, "database": str(tmp_path / "memory.db"), "margin_tokens": MARGIN}
    memory.update(sections.pop("memory", {}))
    upstreams = sections.pop("upstreams", {"local": up})
    return make_proxy(upstreams, memory=memory, **sections)


def chat(
    proxy: RunningServer,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> httpx.Response:
    response = httpx.post(f"{proxy.url}{path}", json=body, headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def play(
    proxy: RunningServer,
    up: FakeUpstream,
    user_turns: list[str],
    *,
    history: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
) -> list[tuple[str, str]]:
    """Send user turns one by one like SillyTavern (whole history every time)."""
    history = list(history or [])
    for i, text in enumerate(user_turns):
        history.append(("user", text))
        reply = f"Mira answers turn {len(history)} thoughtfully."
        up.enqueue(Reply(text=reply))
        chat(proxy, st_body(history, stream=stream, world_info=f"entry {i}"), headers)
        history.append(("assistant", reply))
    return history


def test_long_chat_is_trimmed_to_the_budget_keeping_system_and_last_user_message(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    history = play(proxy, llama, [filler(i) for i in range(60)])
    history.append(("user", "What do you see on the horizon?"))
    body = st_body(history)
    response = chat(proxy, body)
    sent = llama.last["messages"]
    counter = TokenCounter("o200k_base")
    assert counter.count_messages(body["messages"]) > WINDOW  # it really had to trim
    assert counter.count_messages(sent) <= WINDOW - MAX_TOKENS - MARGIN
    assert sent[-1] == {"role": "user", "content": "What do you see on the horizon?"}
    system = [m["content"] for m in sent if m["role"] == "system"]
    assert MAIN_PROMPT in system and "[Start a new Chat]" in system
    assert int(response.headers["x-memory-trimmed"]) > 0
    assert int(response.headers["x-memory-tokens-saved"]) > 0
    kept = [m["content"] for m in sent if m["role"] in ("user", "assistant")]
    assert kept[-3:] == [text for _, text in history[-3:]]  # the newest turns, in order


def test_relevant_old_turn_is_injected_with_date_and_speaker(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    turns = [filler(i) for i in range(50)]
    turns[3] = "My sister Ana keeps a lighthouse on the island of Vessel Rock."
    history = play(proxy, llama, turns)
    history.append(("user", "Do you remember where Ana keeps her lighthouse?"))
    response = chat(proxy, st_body(history))
    sent = llama.last["messages"]
    assert not any("Vessel Rock" in m["content"] for m in sent if m["role"] == "user")
    block = memory_block(sent)
    assert block is not None and "Tom: My sister Ana keeps a lighthouse" in block
    assert "newer one is right" in block  # the model is told newer facts win
    assert int(response.headers["x-memory-injected"]) >= 1
    # Placed just before the last user message, where models use it best.
    assert sent[-2]["content"] == block and sent[-1]["role"] == "user"


def test_style_sample_shown_once_the_greeting_left_the_window(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    play(proxy, llama, [filler(i) for i in range(2)])
    # While the greeting is in the window the model sees the real thing, no sample.
    assert "speaks" not in (memory_block(llama.last["messages"]) or "")
    history = play(proxy, llama, [filler(i) for i in range(60)])
    history.append(("user", "Shall we rest?"))
    chat(proxy, st_body(history))
    sent = llama.last["messages"]
    assert GREETING not in [m["content"] for m in sent if m["role"] == "assistant"]
    block = memory_block(sent)
    assert block is not None
    assert "How Mira speaks" in block and GREETING in block


def test_swiped_reply_is_undone_and_never_injected(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    history = [("user", "Tell me about the old observatory.")]
    llama.enqueue(Reply(text="The observatory burned down in the winter of the purple comet."))
    scope = chat(proxy, st_body(history)).headers["x-memory-scope"]
    # Swipe: SillyTavern sends the byte-identical body again.
    llama.enqueue(Reply(text="The observatory still stands, its telescope pointed at Orion."))
    chat(proxy, st_body(history))
    history.append(("assistant", "The observatory still stands, its telescope pointed at Orion."))
    rows = transcript_of(tmp_path / "memory.db", scope)
    states = {r.content: r.state for r in rows}
    assert states["The observatory burned down in the winter of the purple comet."] == "undone"
    assert states["The observatory still stands, its telescope pointed at Orion."] == "active"
    assert [r.content for r in rows].count("Tell me about the old observatory.") == 1
    turns = [filler(i) for i in range(50)]
    history = play(proxy, llama, turns, history=history)
    history.append(("user", "What happened to the observatory and the purple comet?"))
    chat(proxy, st_body(history))
    block = memory_block(llama.last["messages"]) or ""
    assert "burned down" not in block
    assert "telescope pointed at Orion" in block


def test_a_thinking_models_reasoning_is_not_remembered_and_its_answer_continues(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "thinker"}
    answers = [f"*Mira points north.* Tower {i} stands on the cliff." for i in range(3)]
    history: list[tuple[str, str]] = []
    for i, answer in enumerate(answers):
        history.append(("user", f"Tell me about tower {i}."))
        reply = f"<think>\nThe user asks about tower {i}. Plan.\n</think>\n\n{answer}"
        llama.enqueue(Reply(text=reply))
        chat(proxy, st_body(history, stream=True), headers)
        # SillyTavern keeps the answer alone (its reasoning parsing), or all of it.
        history.append(("assistant", answer if i < 2 else reply))
    history.append(("user", "And the harbour?"))
    llama.enqueue(Reply(text="<think>hm</think>The harbour is quiet."))
    chat(proxy, st_body(history), headers)
    rows = transcript_of(tmp_path / "memory.db", "thinker")
    assert [r.state for r in rows] == ["active"] * len(rows)  # every turn a continuation
    replies = [r.content for r in rows if r.role == "assistant" and r.content != GREETING]
    assert replies == [*answers, "The harbour is quiet."]
    store = open_store(tmp_path / "memory.db")
    try:
        scope = store.read_sync(records.get_scope, "", "thinker")
        assert scope is not None
        texts = [m.text for m in store.read_sync(records.list_memories, scope.id, limit=100)]
    finally:
        store.close_sync()
    assert "The harbour is quiet." in texts
    assert not any("think" in t or "Plan." in t or "hm" in t.split() for t in texts)


def test_continue_with_prefill_stores_the_reply_whole(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "cont"}
    history = [("user", "Count for me.")]
    llama.enqueue(Reply(text="alpha beta gamma"))
    chat(proxy, st_body(history), headers)
    # SillyTavern's "continue" with prefill: the reply so far comes last, the model
    # answers with the rest only.
    history.append(("assistant", "alpha beta gamma"))
    llama.enqueue(Reply(text=" delta epsilon."))
    chat(proxy, st_body(history), headers)
    rows = transcript_of(tmp_path / "memory.db", "cont")
    active = [r.content for r in rows if r.state == "active" and r.content != GREETING]
    assert active == ["Count for me.", "alpha beta gamma delta epsilon."]
    # The next turn sends it whole, as stored: a continuation, nothing undone again.
    undone = sum(r.state == "undone" for r in rows)
    history[-1] = ("assistant", "alpha beta gamma delta epsilon.")
    history.append(("user", "Thanks."))
    chat(proxy, st_body(history), headers)
    rows = transcript_of(tmp_path / "memory.db", "cont")
    assert sum(r.state == "undone" for r in rows) == undone
    assert [r.content for r in rows if r.state == "active"][-3:-1] == [
        "alpha beta gamma delta epsilon.",
        "Thanks.",
    ]


def test_send_with_an_empty_box_after_the_greeting_is_a_new_message_not_a_continuation(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # SillyTavern, Send with nothing typed: the chat so far (only the greeting), and
    # the character is to speak again, in a message of its own.
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "empty-send"}
    llama.enqueue(Reply(text="Are you lost?"))
    chat(proxy, st_body([]), headers)
    llama.enqueue(Reply(text="Still here, traveler?"))  # swiped: the same request again
    chat(proxy, st_body([]), headers)
    history = [("assistant", "Still here, traveler?"), ("user", "Yes. Where to?")]
    llama.enqueue(Reply(text="North."))
    chat(proxy, st_body(history), headers)
    rows = transcript_of(tmp_path / "memory.db", "empty-send")
    assert [(r.content, r.state) for r in rows] == [  # one chat, nothing glued or twice
        (GREETING, "active"),
        ("Are you lost?", "undone"),
        ("Still here, traveler?", "active"),
        ("Yes. Where to?", "active"),
        ("North.", "active"),
    ]
    scope = httpx.get(f"{proxy.url}/memory/scopes/empty-send").json()
    assert scope["threads"] == 1


def test_open_webuis_title_task_is_not_stored_as_a_turn_of_the_chat(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-OpenWebUI-Chat-Id": "5d1c0e4a-chat", "X-OpenWebUI-User-Id": "u-1"}
    chat_turn = [{"role": "user", "content": "Where is the lighthouse?"}]
    llama.enqueue(Reply(text="On Vessel Rock."))
    chat(proxy, {"model": "fake-model", "messages": chat_turn}, headers)
    # What Open WebUI sends next, with the same headers, to name the chat.
    task = (
        "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat "
        'history.\n### Output:\nJSON format: { "title": "your concise title here" }\n'
        "<chat_history>\nUSER: Where is the lighthouse?\nASSISTANT: On Vessel Rock.\n"
        "</chat_history>"
    )
    # Its emoji (voice calls) and mixture-of-agents prompts, by their default wording.
    emoji = (
        "Your task is to reflect the speaker's likely facial expression through a fitting"
        " emoji. Interpret emotions from the message and reflect their facial expression"
        " using fitting, diverse emojis (e.g., 😊, 😢, 😡, 😱).\n\nMessage: ```On Vessel Rock.```"
    )
    moa = (
        "You have been provided with a set of responses from various models to the latest"
        ' user query: "Where is the lighthouse?"\n\nYour task is to synthesize these'
        " responses into a single, high-quality response."
    )
    for text, reply in ((task, '{"title": "🗼 Lighthouse location"}'), (emoji, "🗼"), (moa, "x")):
        llama.enqueue(Reply(text=reply))
        body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
        chat(proxy, body, headers)
    scopes = httpx.get(f"{proxy.url}/memory/scopes").json()["scopes"]
    [scope] = [s for s in scopes if s["name"].startswith("owui")]
    transcript = httpx.get(f"{proxy.url}/memory/scopes/{scope['name']}/transcript").json()
    assert [m["content"] for m in transcript["messages"]] == [
        "Where is the lighthouse?",
        "On Vessel Rock.",
    ]


def test_a_reply_to_instructions_alone_is_stored_once_from_the_next_turn(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # A chat without a greeting: the character's first message is asked for with the
    # system prompt alone, then swiped once.
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "no-greeting"}
    prompt = [{"role": "system", "content": MAIN_PROMPT}]
    for text in ("Hello, traveler.", "Welcome, traveler."):
        llama.enqueue(Reply(text=text))
        chat(proxy, {"model": "fake-model", "messages": prompt}, headers)
    turn = [*prompt, {"role": "assistant", "content": "Welcome, traveler."}]
    turn.append({"role": "user", "content": "Thanks."})
    llama.enqueue(Reply(text="Sit down."))
    chat(proxy, {"model": "fake-model", "messages": turn}, headers)
    rows = transcript_of(tmp_path / "memory.db", "no-greeting")
    assert [(r.content, r.state) for r in rows] == [
        ("Welcome, traveler.", "active"),
        ("Thanks.", "active"),
        ("Sit down.", "active"),
    ]
    assert httpx.get(f"{proxy.url}/memory/scopes/no-greeting").json()["threads"] == 1


def test_after_a_turn_is_embedded_the_next_search_finds_its_vectors_cached(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # The worker warms the readers' cache: rebuilt by the next request's search instead,
    # it cost ~2.5 ms of every request at 10k memories (bench/memory.py --write).
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "warm"}
    history = play(proxy, llama, ["Hello.", "Tell me about the lighthouse."], headers=headers)
    store = open_store(tmp_path / "memory.db")  # its readers share the proxy's cache
    try:
        scope = store.read_sync(records.get_scope, "", "warm")
        assert scope is not None

        def cached_and_current() -> bool:
            def look(conn: Any) -> bool:
                entry = vectors._cache_of(conn).get(scope.id)
                packs = tuple((p[0], p[1]) for p in vectors._packs(conn, scope.id))
                waiting = conn.execute(
                    "SELECT count(*) FROM memories WHERE scope_id = ? AND embedded = 0",
                    (scope.id,),
                ).fetchone()[0]
                return (
                    waiting == 0
                    and entry is not None
                    and entry.signature == packs
                    and entry._positions is not None
                )

            return store.read_sync(look)

        wait_until(cached_and_current, what="the new turn's vectors in the readers' cache")
    finally:
        store.close_sync()
    assert len(history) == 4


def group_body(speaker: str, turns: list[dict[str, str]]) -> dict[str, Any]:
    """A SillyTavern group chat request, names in prompt "Default": each character's
    message as "Name: text", the user's bare, a nudge for the character to speak."""
    messages = [
        {
            "role": "system",
            "content": f"Write {speaker}'s next reply in a fictional chat between "
            "Alice, Bob and Tom.",
        },
        {"role": "system", "content": "Alice is a sailor. Bob is a smith."},
        {"role": "system", "content": "[Start a new group chat. Group members: Alice, Bob]"},
        {"role": "assistant", "content": "Alice: Welcome aboard!"},
        {"role": "assistant", "content": "Bob: Hmph."},
        *turns,
        {"role": "system", "content": f"[Write the next reply only as {speaker}.]"},
    ]
    return {"model": "fake-model", "messages": messages, "stream": True}


def test_group_chat_names_in_the_text_keep_each_reply_with_its_speaker(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "crew"}
    turns: list[dict[str, str]] = []
    said = {
        "Alice": "I found the map in the captain's chest.",
        "Bob": "I forged the silver anchor with my own hammer.",
    }
    for i in range(2):
        turns.append({"role": "user", "content": f"Hello crew, day {i}."})
        for speaker, text in said.items():
            reply = f"{text} ({i})"
            # A model sometimes begins with the name itself; SillyTavern shows it once.
            llama.enqueue(Reply(text=f"{speaker}: {reply}" if i else reply))
            chat(proxy, group_body(speaker, turns), headers)
            turns.append({"role": "assistant", "content": f"{speaker}: {reply}"})
    turns.append({"role": "user", "content": "Who made the anchor?"})
    note = {"text": "The ship sails at dawn.", "pinned": True}  # so that a block is shown
    httpx.post(f"{proxy.url}/memory/scopes/crew/memories", json=note).raise_for_status()
    llama.enqueue(Reply(text="Bob did."))
    chat(proxy, group_body("Alice", turns), headers)
    # The block speaks of the whole group, not only of who speaks next.
    assert "between Alice, Bob and Tom" in (memory_block(llama.last["messages"]) or "")
    rows = transcript_of(tmp_path / "memory.db", "crew")
    assert [r.state for r in rows] == ["active"] * len(rows)  # no reply undone, none twice
    assert [(r.speaker, r.content) for r in rows if r.role == "assistant"] == [
        ("Alice", "Welcome aboard!"),
        ("Bob", "Hmph."),
        *[(who, f"{text} ({i})") for i in range(2) for who, text in said.items()],
        ("Alice", "Bob did."),
    ]
    assert [r.speaker for r in rows if r.role == "user"] == ["Tom"] * 3
    store = open_store(tmp_path / "memory.db")
    try:  # the sample (the first reply, Alice's greeting) is shown as Alice's voice
        scope = store.read_sync(records.get_scope, "", "crew")
        assert scope is not None
        context = store.read_sync(scope_context, scope.id)
    finally:
        store.close_sync()
    assert (context.style_text, context.style_speaker) == ("Welcome aboard!", "Alice")


def test_a_swiped_first_reply_is_not_shown_as_the_style_sample_of_the_regenerate(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    # A chat without a greeting (Open WebUI, an SDK): the first reply is the sample.
    body = {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "You are Kira."},
            {"role": "user", "content": "Tell me a secret."},
        ],
    }
    headers = {"X-Memory-Scope": "swipe1"}
    llama.enqueue(Reply(text="The vault code is 1234, darling."))
    chat(proxy, body, headers)
    llama.enqueue(Reply(text="I never tell secrets."))
    chat(proxy, body, headers)  # regenerate: the same body
    assert "1234" not in json.dumps(llama.last["messages"])


def test_identical_request_twice_stores_nothing_twice_and_write_off_stores_no_text(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "retry-test"}
    body = st_body([("user", "Hello there!")])
    chat(proxy, body, headers)
    chat(proxy, body, headers)  # the SDK retried after a lost response
    rows = [r for r in transcript_of(tmp_path / "memory.db", "retry-test") if r.state != "undone"]
    assert [r.content for r in rows].count("Hello there!") == 1
    assert sum(r.role == "assistant" and r.content != GREETING for r in rows) == 1
    before = len(transcript_of(tmp_path / "memory.db", "retry-test"))
    off = {**headers, "X-Memory-Write": "off"}
    chat(proxy, st_body([("user", "Hello there!"), ("assistant", "Hi"), ("user", "Secret")]), off)
    added = transcript_of(tmp_path / "memory.db", "retry-test")[before:]
    # The app's edit of the earlier (ordinary) reply is that turn's; the exchange itself
    # is kept for alignment only, without a word (tests/test_write_off.py has the rest).
    assert [(r.role, r.private, r.content) for r in added] == [
        ("assistant", False, "Hi"),
        ("user", True, ""),
        ("assistant", True, ""),
    ]


def test_scope_from_path_header_user_field_and_invalid_names(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    body = st_body([("user", "hi")])
    assert (
        chat(proxy, body, path="/s/campaign-1/v1/chat/completions").headers["x-memory-scope"]
        == "campaign-1"
    )
    assert chat(proxy, body, {"X-Memory-Scope": "my-chat"}).headers["x-memory-scope"] == "my-chat"
    assert chat(proxy, {**body, "user": "alice"}).headers["x-memory-scope"] == "alice"
    auto = chat(proxy, body).headers["x-memory-scope"]
    assert auto.startswith("auto-")
    for bad in ("..", "a/b", "x" * 300, "bad name"):
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions", json=body, headers={"X-Memory-Scope": bad}
        )
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] == "scope"
    traversal = httpx.post(f"{proxy.url}/s/..%2F..%2Fetc/v1/chat/completions", json=body)
    assert traversal.status_code in (400, 404)
    assert "error" in traversal.json()


def test_each_key_has_its_own_memory(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path, auth={"keys": ["key-alice", "key-bob"]})
    alice = {"Authorization": "Bearer key-alice", "X-Memory-Scope": "shared-name"}
    bob = {"Authorization": "Bearer key-bob", "X-Memory-Scope": "shared-name"}
    turns = [filler(i) for i in range(60)]  # more than the window holds
    turns[2] = "The vault combination is seven-seven-nine-quill."
    history = play(proxy, llama, turns, headers=alice)
    history.append(("user", "What is the vault combination?"))
    chat(proxy, st_body(history), alice)
    assert "seven-seven-nine-quill" in (memory_block(llama.last["messages"]) or "")
    chat(proxy, st_body([("user", "What is the vault combination? quill")]), bob)
    assert "seven-seven-nine-quill" not in json.dumps(llama.last["messages"])


def test_memory_fails_open_when_embeddings_are_unavailable(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(
        make_proxy,
        llama,
        tmp_path,
        upstreams={"local": {"base_url": llama}, "gone": {"base_url": "http://127.0.0.1:9/v1"}},
        embeddings={"backend": "upstream", "upstream": "gone", "model": "x"},
        server={"default_upstream": "local"},
    )
    turns = [filler(i) for i in range(60)]
    turns[1] = "The password to the archive is heliotrope."
    history = play(proxy, llama, turns)
    history.append(("user", "What was the archive password, heliotrope or not?"))
    response = chat(proxy, st_body(history))
    assert "embedding" in response.headers["x-memory-error"]
    # Keyword recall still works without vectors.
    assert "heliotrope" in (memory_block(llama.last["messages"]) or "")


def test_requests_pass_through_while_the_embedder_warms_up_then_recall_uses_it(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with FakeUpstream() as embedder:
        embedder.embeddings_open.clear()  # the embedding model is still loading
        proxy = memory_proxy(
            make_proxy,
            llama,
            tmp_path,
            upstreams={"local": {"base_url": llama}, "emb": {"base_url": embedder}},
            embeddings={"backend": "upstream", "upstream": "emb", "model": "x"},
            server={"default_upstream": "local"},
        )
        history = play(proxy, llama, ["The lighthouse keeper is called Ana."])
        history.append(("user", "Who keeps the lighthouse?"))
        response = chat(proxy, st_body(history), {"X-Memory-Write": "off"})
        assert response.headers["x-memory-error"] == "warming up"
        assert llama.last["messages"][-1]["content"] == "Who keeps the lighthouse?"

        embedder.embeddings_open.set()

        def warmed() -> bool:
            answer = chat(proxy, st_body(history), {"X-Memory-Write": "off"})
            return "x-memory-error" not in answer.headers

        wait_until(warmed, 30, "the embedder to start")
        stored = [r for r in embedder.requests if r.path == "/v1/embeddings"]
        assert any("Ana" in json.dumps(r.json) for r in stored)  # the turn got embedded


def test_an_embedding_server_that_starts_after_the_proxy_is_used_once_it_is_up(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there yet
    proxy = memory_proxy(
        make_proxy,
        llama,
        tmp_path,
        upstreams={"local": {"base_url": llama}, "emb": f"http://127.0.0.1:{port}/v1"},
        embeddings={"backend": "upstream", "upstream": "emb", "model": "x"},
        server={"default_upstream": "local"},
    )
    history = [("user", "Who keeps the lighthouse?")]
    response = chat(proxy, st_body(history), {"X-Memory-Write": "off"})
    assert "embedding model unavailable" in response.headers["x-memory-error"]
    with FakeUpstream(port=port):

        def ready() -> bool:
            answer = chat(proxy, st_body(history), {"X-Memory-Write": "off"})
            return "x-memory-error" not in answer.headers

        wait_until(ready, 15, "the embedder to be tried again")


def test_embeddings_take_the_client_key_the_upstream_accepted(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    # An OpenAI-style setup without a key in the config: the app's key is forwarded.
    proxy = memory_proxy(
        make_proxy,
        llama,
        tmp_path,
        upstreams={"local": {"base_url": llama, "forward_client_key": True}},
    )
    headers = {"Authorization": "Bearer sk-users-own", "X-Memory-Scope": "keyed"}
    chat(proxy, st_body([("user", "The lighthouse keeper is called Ana.")]), headers)

    def embedded_with_key() -> bool:
        # The stored turn is embedded after the reply: by then the key is known to work.
        # (The request's own query went before it was, without one.)
        paths = [r.path for r in llama.requests]
        after = llama.requests[paths.index("/v1/chat/completions") + 1 :]
        turns = [r for r in after if r.path == "/v1/embeddings"]
        return any(b"Ana" in r.body for r in turns) and all(
            r.headers.get("authorization") == "Bearer sk-users-own" for r in turns
        )

    wait_until(embedded_with_key, what="the turn embedded with the client's key")


def test_stream_cut_by_the_client_stores_what_was_received_as_partial(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    llama.enqueue(
        Reply(chunks=["Once ", "upon ", "a ", "time ", "there ", "was "] * 5, delay_between=0.1)
    )
    body = st_body([("user", "Tell me a long story.")], stream=True)
    with httpx.stream(
        "POST",
        f"{proxy.url}/v1/chat/completions",
        json=body,
        headers={"X-Memory-Scope": "cut"},
    ) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 4:
                    break

    def partial_stored() -> bool:
        rows = transcript_of(tmp_path / "memory.db", "cut")
        return any(r.state == "partial" for r in rows)

    wait_until(partial_stored, what="the partial reply")
    rows = transcript_of(tmp_path / "memory.db", "cut")
    reply = next(r for r in rows if r.state == "partial")
    assert reply.content.startswith("Once upon")
    assert "Tell me a long story." in [r.content for r in rows]


def test_images_pass_through_and_their_text_is_remembered(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    message = {"role": "user", "content": [{"type": "text", "text": "What is in this map?"}, image]}
    body = {"model": "fake-model", "messages": [message]}
    chat(proxy, body, {"X-Memory-Scope": "img"})
    assert llama.last["messages"][-1] == message
    rows = transcript_of(tmp_path / "memory.db", "img")
    assert rows[0].content == "What is in this map?"
    assert rows[0].raw["content"][1] == image


def test_tool_calls_and_n_greater_than_one_are_stored_sensibly(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    call = {"id": "call_1", "type": "function", "function": {"name": "roll", "arguments": "{}"}}
    llama.enqueue(Reply(tool_calls=[call]))
    messages = [{"role": "user", "content": "Roll a die for me."}]
    chat(proxy, {"model": "fake-model", "messages": messages}, {"X-Memory-Scope": "tools"})
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "4"}
    llama.enqueue(Reply(text="You rolled a four."))
    more = [*messages, assistant, tool]
    chat(proxy, {"model": "fake-model", "messages": more, "n": 2}, {"X-Memory-Scope": "tools"})
    rows = transcript_of(tmp_path / "memory.db", "tools")
    assert [r.role for r in rows if r.state == "active"] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert rows[1].raw["tool_calls"][0]["function"]["name"] == "roll"
    assert rows[-1].content == "You rolled a four."  # the first choice is the one kept


def test_empty_and_huge_messages(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    empty = {"model": "fake-model", "messages": [{"role": "user", "content": ""}]}
    assert chat(proxy, empty, {"X-Memory-Scope": "edge"}).status_code == 200
    huge = "A very long letter. " * 5000  # ~25k tokens: more than the whole window
    body = {"model": "fake-model", "messages": [{"role": "user", "content": huge}]}
    response = chat(proxy, body, {"X-Memory-Scope": "edge"})
    assert llama.last["messages"][-1]["content"] == huge  # never cut: the upstream judges
    assert response.headers["x-memory-trimmed"] == "0"
    rows = transcript_of(tmp_path / "memory.db", "edge")
    assert rows[-2].content == huge
    store = open_store(tmp_path / "memory.db")
    try:
        scope = store.read_sync(records.get_scope, "", "edge")
        pieces = store.read_sync(records.list_memories, scope.id, kinds=["turn"], limit=1000)
    finally:
        store.close_sync()
    assert len([m for m in pieces if "long letter" in m.text]) > 20  # cut for the embedder


def test_x_memory_now_dates_the_turn(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "dated", "X-Memory-Now": "2023-05-04T10:00:00Z"}
    chat(proxy, st_body([("user", "It is my birthday today.")]), headers)
    rows = transcript_of(tmp_path / "memory.db", "dated")
    assert any(r.content == "It is my birthday today." and r.seen_at == 1683194400 for r in rows)
    # Not a date, or none the store can hold (and export, and import again): 400, and
    # nothing is written that would break listing the scopes.
    for now in (
        "next tuesday",
        "inf",
        "-inf",
        "nan",
        "1e20",
        "-1",
        "0001-01-01",
        "0001-01-01T00:00:00Z",
        "1969-07-20T20:17:00Z",
    ):
        bad = httpx.post(
            f"{proxy.url}/s/never/v1/chat/completions",
            json=st_body([("user", "x")]),
            headers={"X-Memory-Now": now},
        )
        assert bad.status_code == 400, (now, bad.text)
        assert bad.json()["error"]["param"] == "X-Memory-Now"
    scopes = httpx.get(f"{proxy.url}/memory/scopes")
    assert scopes.status_code == 200
    assert [s["name"] for s in scopes.json()["scopes"]] == ["dated"]


def test_budget_learns_the_upstreams_own_token_counts(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)  # prepares tiktoken's files
    counter = TokenCounter("o200k_base")
    # A model whose tokenizer needs twice the tokens ours counts: it says so in usage.
    llama.responder = lambda body: Reply(
        text="Mira nods.", usage={"prompt_tokens": 2 * counter.count_messages(body["messages"])}
    )
    history = [(r, filler(i)) for i in range(80) for r in ("user", "assistant")][:-1]
    before = chat(proxy, st_body(history), {"X-Memory-Scope": "tok"})
    sent_before = counter.count_messages(llama.last["messages"])
    after = chat(proxy, st_body(history), {"X-Memory-Scope": "tok", "X-Memory-Write": "off"})
    sent_after = counter.count_messages(llama.last["messages"])
    assert int(after.headers["x-memory-trimmed"]) > int(before.headers["x-memory-trimmed"])
    # In the upstream's own tokens the prompt now fits its window.
    assert 2 * sent_after <= WINDOW - MAX_TOKENS
    assert sent_after < sent_before


def test_in_a_small_window_the_block_leaves_the_latest_turns_room(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with FakeUpstream(flavor="llamacpp", context_window=1400) as small:
        proxy = memory_proxy(make_proxy, small, tmp_path)
        history = play(proxy, small, [filler(i) for i in range(40)])  # more than it holds
        # A question about what the latest turns say: recall finds them all.
        history.append(("user", "Do we still walk on along the road in grey weather?"))
        response = chat(proxy, st_body(history, max_tokens=300))
        sent = small.last["messages"]
        kept = [m["content"] for m in sent if m["role"] in ("user", "assistant")]
        # The newest turns stay in the chat, not only the last message.
        assert len(kept) >= 4 and kept[-4:] == [text for _, text in history[-4:]]
        block = memory_block(sent)
        assert block is not None and int(response.headers["x-memory-injected"]) > 0
        budget = 1400 - 300 - MARGIN
        assert TokenCounter("o200k_base").count_text(block) <= budget // 2


def test_a_history_that_fits_is_sent_whole_not_as_recalled_copies(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    headers = {"X-Memory-Scope": "fits"}
    history: list[tuple[str, str]] = []
    checked = 0
    for i in range(0, 60, 4):
        for j in range(i, i + 4):
            history += [("user", filler(j)), ("assistant", f"Reply {j}: the road goes on.")]
        llama.enqueue(Reply(text="Mira nods."))
        response = chat(proxy, st_body([*history, ("user", "And now?")]), headers)
        entry = httpx.get(
            f"{proxy.url}/memory/requests/{response.headers['x-memory-request-id']}"
        ).json()["detail"]
        if entry["tokens"]["original"] <= entry["budget"]:  # the whole chat fits
            checked += 1
            assert response.headers["x-memory-trimmed"] == "0", entry["tokens"]
        elif int(response.headers["x-memory-trimmed"]):  # trimmed: for fewer tokens
            assert entry["tokens"]["sent"] < entry["tokens"]["original"]
    assert checked >= 3


def test_a_utility_call_for_a_chat_not_seen_yet_leaves_no_scope(
    llama: FakeUpstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = memory_proxy(make_proxy, llama, tmp_path)
    task = "### Task:\nGenerate a title.\n<chat_history>\nUSER: Hi\n</chat_history>"
    body = {"model": "fake-model", "messages": [{"role": "user", "content": task}]}
    response = chat(proxy, body, {"X-OpenWebUI-User-Id": "u-1"})
    assert response.headers["x-memory-scope"] == "owui-user-u-1"
    assert httpx.get(f"{proxy.url}/memory/scopes").json()["scopes"] == []
