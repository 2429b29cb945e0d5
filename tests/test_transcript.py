"""Aligning requests with the stored transcript, replayed as SillyTavern sends them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.memory.transcript import (
    Alignment,
    StoredMessage,
    TranscriptIndex,
    align,
    conversation_indices,
    message_fingerprint,
)
from proxy.messages import without_reasoning

GREETING = "*Seraphina looks up from the herbs she is sorting.* Oh! You're awake."


def st_request(
    history: list[tuple[str, str]],
    *,
    turn: int = 0,
    greeting: str | None = GREETING,
) -> list[dict[str, Any]]:
    """Messages of a SillyTavern character chat: system prompts, greeting, turns.

    World Info changes with every turn, as it does when keywords come and go.
    """
    messages: list[dict[str, Any]] = [
        {
            "role": "system",
            "content": "Write Seraphina's next reply in a fictional chat between "
            "Seraphina and Alex.",
        },
        {"role": "system", "content": f"[Eldoria: a forest realm. Turn marker {turn}]"},
        {"role": "system", "content": "Seraphina is a kind guardian of the forest."},
        {"role": "system", "content": "[Start a new Chat]"},
    ]
    if greeting is not None:
        messages.append({"role": "assistant", "content": greeting})
    messages += [{"role": role, "content": text} for role, text in history]
    return messages


def turns(count: int, tag: str = "") -> list[tuple[str, str]]:
    """`count` user/assistant exchanges with distinct texts."""
    out: list[tuple[str, str]] = []
    for k in range(1, count + 1):
        out.append(("user", f"message {k}{tag} from Alex"))
        out.append(("assistant", f"reply {k}{tag} from Seraphina, at some length."))
    return out


@dataclass
class Store:
    """The store's side of the contract, reduced to an active line of messages."""

    rows: list[tuple[int, str, str, str, int]] = field(
        default_factory=list
    )  # id, role, fp, text, thread
    retracted: list[str] = field(default_factory=list)
    next_id: int = 1
    thread: int = 0  # the chat new messages go to

    def stored(self) -> list[StoredMessage]:
        return [StoredMessage(id=r[0], role=r[1], fingerprint=r[2], thread=r[4]) for r in self.rows]

    def texts(self) -> list[str]:
        return [r[3] for r in self.rows]

    def ids_of(self, *texts: str) -> tuple[int, ...]:
        return tuple(next(r[0] for r in self.rows if r[3] == t) for t in texts)

    def add(self, message: dict[str, Any]) -> None:
        text = message.get("content") or ""
        fp = message_fingerprint(message)
        self.rows.append((self.next_id, message["role"], fp, text, self.thread))
        self.next_id += 1

    def receive(self, messages: list[dict[str, Any]], reply: str | None = None) -> Alignment:
        """Align a request, apply it, then store the reply (as the route would)."""
        result = align(messages, self.stored())
        # As the store does: continue the run's chat, or open a new one.
        self.thread = result.thread if result.thread is not None else self.thread + 1
        gone = set(result.undone)
        self.retracted += [r[3] for r in self.rows if r[0] in gone]
        self.rows = [r for r in self.rows if r[0] not in gone]
        for index in result.new:
            self.add(messages[index])
        if reply is not None:
            self.add({"role": "assistant", "content": reply})
        return result


def chat_of(store: Store, count: int, tag: str = "") -> list[tuple[str, str]]:
    """Play `count` turns of one chat into `store`; return its history."""
    pairs = turns(count, tag)
    history: list[tuple[str, str]] = []
    for k in range(0, len(pairs), 2):
        history.append(pairs[k])
        store.receive(st_request(history, turn=k), reply=pairs[k + 1][1])
        history.append(pairs[k + 1])
    return history


def conv_texts(messages: list[dict[str, Any]]) -> list[str]:
    return [messages[i]["content"] for i in conversation_indices(messages)]


# -- fingerprints ------------------------------------------------------------------


def test_fingerprint_treats_cosmetic_differences_as_the_same_message() -> None:
    plain = message_fingerprint({"role": "user", "content": "Hello there"})
    assert message_fingerprint({"role": "user", "content": "  Hello there\r\n"}) == plain
    parts = {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}
    assert message_fingerprint(parts) == plain
    assert message_fingerprint({"role": "user", "content": "Hello there", "x": 1}) == plain
    assert message_fingerprint({"role": "user", "content": "Hello there", "name": ""}) == plain


def test_fingerprint_tells_different_messages_apart() -> None:
    plain = message_fingerprint({"role": "user", "content": "Hello there"})
    assert message_fingerprint({"role": "assistant", "content": "Hello there"}) != plain
    assert message_fingerprint({"role": "user", "content": "Hello there", "name": "Bo"}) != plain
    assert message_fingerprint({"role": "user", "content": "Hello  there"}) != plain
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    other = {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}
    text = {"type": "text", "text": "Hello there"}
    with_image = message_fingerprint({"role": "user", "content": [text, image]})
    assert with_image != plain
    assert with_image != message_fingerprint({"role": "user", "content": [text, other]})


def test_fingerprint_of_a_reply_ignores_its_reasoning() -> None:
    # The app keeps the answer alone (SillyTavern's reasoning parsing), or all of it.
    answer = message_fingerprint({"role": "assistant", "content": "*Mira nods.* Yes."})
    for reply in (
        "<think>\nThe user asks. I agree.\n</think>\n\n*Mira nods.* Yes.",
        "<THINKING>plan</THINKING>*Mira nods.* Yes.",
        "The user asks; the prompt opened the block.</think>\n*Mira nods.* Yes.",
    ):
        assert message_fingerprint({"role": "assistant", "content": reply}) == answer
    # Only a reply's leading block is reasoning; a user's tags are their words.
    quoted = "*Mira nods.* Yes. <think>inside</think>"
    assert message_fingerprint({"role": "assistant", "content": quoted}) != answer
    user = message_fingerprint({"role": "user", "content": "<think>hm</think> Yes."})
    assert user != message_fingerprint({"role": "user", "content": "Yes."})


def test_without_reasoning() -> None:
    assert without_reasoning("<think>a</think>\n\nB <think>c</think>") == "B <think>c</think>"
    assert without_reasoning("  <reasoning>a\nb</reasoning> B") == "B"
    assert without_reasoning("<think>cut while thinking") == ""
    assert without_reasoning("a</think>B") == "B"
    assert without_reasoning("<thinking>a</think>B") == "B"  # mismatched: up to the close
    assert without_reasoning("B") == "B" and without_reasoning("") == ""
    assert without_reasoning("I <think> so </think> too") == "I <think> so </think> too"


def test_fingerprint_accepts_a_lone_surrogate() -> None:
    truncated = message_fingerprint({"role": "assistant", "content": "Hi \ud83d"})
    assert truncated != message_fingerprint({"role": "assistant", "content": "Hi"})


def test_fingerprint_is_stable_across_releases() -> None:
    # Stored transcripts keep fingerprints: changing the function orphans them all.
    assert message_fingerprint({"role": "user", "content": "hi"}) == "40868b7bcf44921b"


def test_fingerprint_of_tool_calls() -> None:
    def call(call_id: str, arguments: str) -> dict[str, Any]:
        function = {"name": "get_weather", "arguments": arguments}
        tool_call = {"id": call_id, "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [tool_call]}

    compact = message_fingerprint(call("call_1", '{"city":"Oslo","unit":"C"}'))
    spaced = message_fingerprint(call("call_1", '{"unit": "C", "city": "Oslo"}'))
    assert compact == spaced
    assert message_fingerprint(call("call_2", '{"city":"Oslo","unit":"C"}')) != compact
    assert message_fingerprint(call("call_1", '{"city":"Bergen","unit":"C"}')) != compact
    result = {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}
    other = {"role": "tool", "tool_call_id": "call_2", "content": "12 C"}
    assert message_fingerprint(result) != message_fingerprint(other)


def test_conversation_indices_skip_system_prompts() -> None:
    messages = st_request([("user", "hi")])
    assert conversation_indices(messages) == [4, 5]


# -- the cases ---------------------------------------------------------------------


def test_empty_store_takes_everything_as_new() -> None:
    store = Store()
    messages = st_request([("user", "Where am I?")])
    result = store.receive(messages, reply="In my glade.")
    assert result.kind == "empty"
    assert result.new == (4, 5)
    assert result.undone == () and result.matched == ()
    assert store.texts() == [GREETING, "Where am I?", "In my glade."]


def test_continuation_appends_only_the_new_user_message() -> None:
    store = Store()
    history = chat_of(store, 3)
    messages = st_request([*history, ("user", "And then?")], turn=9)
    before = store.stored()
    result = store.receive(messages)
    assert result.kind == "continuation"
    assert result.new == (len(messages) - 1,)
    assert result.undone == ()
    ids = [m.id for m in before]
    assert result.matched == tuple(zip(range(4, len(messages) - 1), ids, strict=True))
    assert store.texts() == conv_texts(messages)


def test_head_trimmed_by_the_app_undoes_nothing() -> None:
    store = Store()
    history = chat_of(store, 10)
    texts_before = store.texts()
    window = history[12:]  # SillyTavern cut the greeting and turns 1-6
    messages = st_request([*window, ("user", "Tell me more.")], greeting=None)
    result = store.receive(messages)
    assert result.kind == "head_trimmed"
    assert result.undone == ()
    assert result.new == (len(messages) - 1,)
    assert [i for i, _ in result.matched] == list(range(4, len(messages) - 1))
    assert store.texts() == [*texts_before, "Tell me more."]


def test_greeting_kept_while_the_middle_was_cut() -> None:
    store = Store()
    history = chat_of(store, 10)
    greeting_id = store.ids_of(GREETING)[0]
    messages = st_request([*history[14:], ("user", "Go on.")])
    result = store.receive(messages)
    assert result.undone == ()
    assert result.kind == "continuation"
    assert result.matched[0] == (4, greeting_id)
    assert result.new == (len(messages) - 1,)
    assert store.texts().count(GREETING) == 1


def test_swipe_resends_the_same_body_and_undoes_the_last_reply() -> None:
    store = Store()
    history = chat_of(store, 4)
    messages = st_request([*history, ("user", "Sing for me.")], turn=4)
    store.receive(messages, reply="La la la.")
    a5 = store.ids_of("La la la.")
    result = store.receive(messages, reply="Hmm hmm hmm.")  # byte-identical body
    assert result.kind == "regenerate"
    assert result.undone == a5
    assert result.new == ()
    assert result.matched[-1][0] == len(messages) - 1  # u5 is matched, not new
    assert store.texts()[-2:] == ["Sing for me.", "Hmm hmm hmm."]
    assert store.retracted == ["La la la."]


def test_retry_after_a_lost_response_stores_nothing_twice() -> None:
    store = Store()
    history = chat_of(store, 2)
    messages = st_request([*history, ("user", "Are you there?")])
    store.receive(messages, reply="Yes.")  # the client never got it
    result = store.receive(messages, reply="Yes, I am.")
    assert result.kind == "regenerate"
    assert store.texts().count("Are you there?") == 1
    assert store.texts()[-1] == "Yes, I am."


def test_user_message_resent_after_a_failed_turn_is_matched() -> None:
    store = Store()
    history = chat_of(store, 4)
    failed = st_request([*history, ("user", "Hello?")])
    store.receive(failed)  # upstream failed: no reply stored
    again = store.receive(failed)
    assert again.kind == "continuation"
    assert again.new == () and again.undone == ()
    follow = st_request([*history, ("user", "Hello?"), ("user", "Anyone?")])
    result = store.receive(follow, reply="Sorry, I was away.")
    assert result.undone == ()
    assert result.new == (len(follow) - 1,)
    assert store.texts().count("Hello?") == 1
    assert store.texts()[-3:] == ["Hello?", "Anyone?", "Sorry, I was away."]


def test_edit_of_an_earlier_message_undoes_from_there_and_reuses_the_rest() -> None:
    store = Store()
    history = chat_of(store, 3)  # u1 a1 u2 a2 u3 a3
    old = store.ids_of(*[text for _, text in history[2:]])
    edited = [*history]
    edited[2] = ("user", "message 2 from Alex, but kinder")
    messages = st_request([*edited, ("user", "message 4 from Alex")])
    result = store.receive(messages)
    assert result.kind == "diverged"
    assert result.undone == old
    assert result.new == tuple(range(7, len(messages)))
    # a2, u3, a3 are unchanged: the store keeps their dates and embeddings
    assert result.reuses == ((8, old[1]), (9, old[2]), (10, old[3]))
    assert store.texts() == conv_texts(messages)


def test_delete_below_then_send_undoes_the_deleted_messages() -> None:
    store = Store()
    history = chat_of(store, 10)
    deleted = [text for _, text in history[-6:]]
    deleted_ids = store.ids_of(*deleted)
    messages = st_request([*history[:-6], ("user", "Let's go back to the river.")])
    result = store.receive(messages)
    assert result.kind == "diverged"
    assert result.undone == deleted_ids  # 6 > max_blind_undo: the long common run is proof
    assert result.reuses == ()
    assert store.texts() == conv_texts(messages)


def test_delete_of_the_last_two_then_regenerate() -> None:
    store = Store()
    history = chat_of(store, 5)
    messages = st_request(history[:-3])  # ends with u4; a4, u5, a5 deleted
    result = store.receive(messages, reply="A new reply 4.")
    assert result.kind == "regenerate"
    assert len(result.undone) == 3
    assert store.texts()[-2:] == ["message 4 from Alex", "A new reply 4."]


def test_new_chat_in_a_named_scope_keeps_the_old_chat_and_the_greeting_once() -> None:
    store = Store()
    chat_of(store, 5)
    old_texts = store.texts()
    greeting_id = store.ids_of(GREETING)[0]
    first = st_request([("user", "Good morning, who are you?")])
    result = store.receive(first, reply="I am Seraphina.")
    assert result.kind == "new_chat"
    assert result.undone == ()
    assert result.matched == ((4, greeting_id),)
    assert result.new == (5,)
    history = [("user", "Good morning, who are you?"), ("assistant", "I am Seraphina.")]
    second = st_request([*history, ("user", "Nice to meet you.")], turn=1)
    result = store.receive(second, reply="Likewise.")
    assert result.kind == "continuation"
    assert result.undone == ()
    assert result.new == (len(second) - 1,)
    # the next turns' regenerate touches only the new chat's last reply
    result = store.receive(second, reply="Likewise, Alex.")
    assert result.kind == "regenerate"
    assert store.retracted == ["Likewise."]
    assert store.texts()[: len(old_texts)] == old_texts
    assert store.texts().count(GREETING) == 1


def test_a_short_common_message_far_back_does_not_undo_a_long_tail() -> None:
    store = Store()
    old = [("user", "hi"), ("assistant", "Hello, traveller."), *turns(10)]
    for k in range(0, len(old), 2):
        store.receive(st_request(old[: k + 1], turn=k), reply=old[k + 1][1])
    old_texts = store.texts()
    # a new chat opens with the same "hi": same text as the old chat's first message
    result = store.receive(st_request([("user", "hi")]), reply="Oh, hello again!")
    assert result.kind == "new_chat"
    assert result.undone == ()
    assert result.new == (5,)
    assert store.texts()[: len(old_texts)] == old_texts
    # its swipe undoes the new chat's reply only, not the old chat after its "hi"
    result = store.receive(st_request([("user", "hi")]), reply="Welcome back.")
    assert result.kind == "regenerate"
    assert store.retracted == ["Oh, hello again!"]
    # and its next turn continues the most recent "hi", not the old one
    history = [("user", "hi"), ("assistant", "Welcome back."), ("user", "What now?")]
    result = store.receive(st_request(history))
    assert result.kind == "continuation"
    assert result.new == (7,)
    assert store.texts().count("hi") == 2


def test_a_new_chat_with_the_same_first_exchange_continues_itself() -> None:
    # A deterministic model gives the same first reply: the run is 2 messages in
    # both chats; the one at the end of the store wins, nothing is undone.
    store = Store()
    old = [("user", "hi"), ("assistant", "Hello, traveller."), *turns(6)]
    for k in range(0, len(old), 2):
        store.receive(st_request(old[: k + 1]), reply=old[k + 1][1])
    store.receive(st_request([("user", "hi")]), reply="Hello, traveller.")
    messages = st_request([*old[:2], ("user", "message 1 from Alex")])
    result = store.receive(messages)
    assert result.undone == ()
    assert result.kind == "continuation"
    assert result.new == (7,)


def test_going_back_to_an_older_chat_undoes_nothing_of_the_newer_one() -> None:
    store = Store()
    chat_a = chat_of(store, 4, tag="A")
    chat_b_first = st_request([("user", "A new story, please.")])
    store.receive(chat_b_first, reply="Once upon a time.")
    chat_b = [("user", "A new story, please."), ("assistant", "Once upon a time.")]
    store.receive(st_request([*chat_b, ("user", "Go on.")], turn=1), reply="There was a fox.")
    newer = store.texts()[-4:]
    # The user reopens chat A and writes in it: chat B stays as it was.
    result = store.receive(st_request([*chat_a, ("user", "Back to the first tale.")], turn=4))
    assert result.undone == ()
    assert result.kind == "continuation"
    assert store.texts()[-5:-1] == newer
    # A swipe in chat A undoes chat A's last reply only.
    store.receive(st_request([*chat_a, ("user", "Back to the first tale.")], turn=4), reply="Yes?")
    result = store.receive(st_request([*chat_a, ("user", "Back to the first tale.")], turn=4))
    assert result.kind == "regenerate"
    assert store.retracted == ["Yes?"]
    # And chat B continues where it was, undoing nothing of chat A.
    chat_b += [("user", "Go on."), ("assistant", "There was a fox.")]
    result = store.receive(st_request([*chat_b, ("user", "And then?")], turn=2))
    assert result.kind == "continuation" and result.undone == ()
    # Delete-below inside chat B undoes chat B's tail, not chat A's newer messages.
    result = store.receive(st_request([*chat_b[:2], ("user", "Different turn.")], turn=1))
    assert result.kind == "diverged"
    assert store.retracted[-3:] == ["Go on.", "There was a fox.", "And then?"]
    assert "Back to the first tale." in store.texts()


def test_blind_undo_limit_is_a_parameter() -> None:
    store = Store()
    history = chat_of(store, 3)
    # the request is only "message 1": a run of one user message, 5 stored after it
    messages = st_request(history[:1])
    assert align(messages, store.stored()).kind == "new_chat"
    relaxed = align(messages, store.stored(), max_blind_undo=5)
    assert relaxed.kind == "regenerate"
    assert len(relaxed.undone) == 5


def test_edit_of_the_first_message_of_a_cut_window_is_skipped_not_duplicated() -> None:
    store = Store()
    history = chat_of(store, 8)
    window = [("user", "message 5 from Alex, edited"), *history[9:]]
    messages = st_request([*window, ("user", "Next.")], greeting=None)
    result = store.receive(messages)
    assert result.undone == ()
    assert result.skipped == (4,)
    assert result.new == (len(messages) - 1,)
    assert store.texts().count("reply 5 from Seraphina, at some length.") == 1


def test_alternate_greeting_of_a_new_chat_is_stored() -> None:
    store = Store()
    chat_of(store, 2)
    other = "*Seraphina is asleep under an oak.*"
    messages = st_request([("user", "Wake up!")], greeting=other)
    result = store.receive(messages)
    assert result.kind == "new_chat"
    assert result.new == (4, 5)
    assert store.texts()[-2:] == [other, "Wake up!"]


def test_greeting_only_request_stores_nothing_twice() -> None:
    store = Store()
    chat_of(store, 2)
    result = align(st_request([]), store.stored())
    assert result.kind == "new_chat"
    assert result.new == () and result.undone == ()
    assert result.matched == ((4, store.ids_of(GREETING)[0]),)


def test_tool_calls_align_like_other_messages() -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    ask = {"role": "user", "content": "Weather in Oslo?"}
    function = {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_9", "type": "function", "function": function}],
    }
    tool = {"role": "tool", "tool_call_id": "call_9", "content": '{"temp": 12}'}
    answer = {"role": "assistant", "content": "It is 12 degrees in Oslo."}

    store = Store()
    store.receive([system, ask])
    store.add(call)  # the route stores the reply: a tool call
    result = store.receive([system, ask, call, tool])
    assert result.kind == "continuation"
    assert result.new == (3,)
    store.add(answer)
    follow = [system, ask, call, tool, answer, {"role": "user", "content": "And Bergen?"}]
    result = store.receive(follow)
    assert result.kind == "continuation"
    assert result.new == (5,)
    # regenerate of the final answer undoes it, keeps the call and the result
    store.add({"role": "assistant", "content": "Rainy, as ever."})
    result = store.receive(follow)
    assert result.kind == "regenerate"
    assert len(result.undone) == 1
    assert [i for i, _ in result.matched] == [1, 2, 3, 4, 5]


def test_align_is_fast_on_a_long_transcript() -> None:
    store = Store()
    history = turns(2500)
    for role, text in history:
        store.add({"role": role, "content": text})
    stored = store.stored()
    messages = st_request([*history[-39:], ("user", "One more thing.")], greeting=None)
    result = align(messages, stored)
    assert result.kind == "head_trimmed"
    assert result.new == (len(messages) - 1,)
    assert len(result.matched) == 39


def test_an_index_built_once_serves_every_request_unchanged() -> None:
    store = Store()
    history = chat_of(store, 30)
    index = TranscriptIndex(store.stored())
    positions = {fp: list(p) for fp, p in index.positions.items()}
    requests = [
        st_request([*history, ("user", "And then?")]),  # continuation
        st_request(history[:-1]),  # swipe of the last reply
        st_request([*history[:10], ("user", "Wait, let me rephrase.")]),  # edit far back
        st_request([("user", "message 1 from Alex")]),  # a new chat, same first line
        st_request(history[-20:], greeting=None),  # head trimmed by the app
    ]
    for messages in requests:
        assert align(messages, index) == align(messages, store.stored())
    # Aligning looks things up and never adds to them (the index is shared).
    assert {fp: list(p) for fp, p in index.positions.items()} == positions


def test_edit_of_the_first_message_after_the_greeting_is_an_edit() -> None:
    store = Store()
    history = chat_of(store, 3)  # u1 a1 u2 a2 u3 a3
    old = store.ids_of(*[text for _, text in history])
    edited = [("user", "message 1 from Alex, but kinder"), *history[1:]]
    messages = st_request([*edited, ("user", "message 4 from Alex")])
    result = store.receive(messages)
    assert result.kind == "diverged" and result.skipped == ()
    assert result.undone == old
    assert result.new == tuple(range(5, len(messages)))
    assert result.reuses == tuple(zip(range(6, 11), old[1:], strict=True))
    assert store.texts() == conv_texts(messages)
    assert "message 1 from Alex" in store.retracted


def test_a_new_chat_with_the_same_greeting_undoes_nothing() -> None:
    store = Store()
    chat_of(store, 3)
    before = store.texts()
    messages = st_request([("user", "A new story: we meet at the harbour.")])
    result = store.receive(messages, reply="*Seraphina waves.*")
    assert result.kind == "new_chat" and result.undone == ()
    assert store.texts()[: len(before)] == before


# -- a chat nobody has spoken in yet -----------------------------------------------


def test_replies_asked_for_after_the_greeting_stay_in_its_chat_and_swipe() -> None:
    # SillyTavern, Send with nothing typed: the greeting alone, the character speaks.
    store = Store()
    store.receive(st_request([]), reply="Are you lost?")
    swipe = store.receive(st_request([]), reply="Still here?")
    assert swipe.kind == "regenerate" and store.retracted == ["Are you lost?"]
    again = store.receive(st_request([("assistant", "Still here?")]), reply="Hello?")
    assert again.kind == "continuation"
    typed = [("assistant", "Still here?"), ("assistant", "Hello?"), ("user", "Yes.")]
    store.receive(st_request(typed), reply="Good.")
    assert store.texts() == [GREETING, "Still here?", "Hello?", "Yes.", "Good."]
    assert {r[4] for r in store.rows} == {1}  # one chat
    # The same greeting once someone has spoken in that chat opens another chat.
    other = store.receive(st_request([]), reply="Welcome back.")
    assert other.kind == "new_chat" and other.undone == ()


def test_edit_of_the_first_messages_of_a_chat_without_a_greeting_is_an_edit() -> None:
    # Open WebUI and SDK chats have no greeting: their first message was edited, not
    # cut (an app that cut its window would have dropped it, not replaced it).
    for edited_at in (0, 1):  # the user's first message, then the first reply
        store = Store()
        history = []
        pairs = turns(4)
        for k in range(0, len(pairs), 2):
            history.append(pairs[k])
            store.receive(st_request(history, greeting=None), reply=pairs[k + 1][1])
            history.append(pairs[k + 1])
        old = store.ids_of(*[text for _, text in history])
        edited = [*history]
        edited[edited_at] = (edited[edited_at][0], "changed, at some length")
        messages = st_request([*edited, ("user", "message 5 from Alex")], greeting=None)
        result = store.receive(messages)
        assert result.kind == "diverged"
        assert result.undone == old
        assert store.texts() == conv_texts(messages)
        # What did not change keeps its date and embedding.
        assert len(result.reuses) == len(history) - 1
