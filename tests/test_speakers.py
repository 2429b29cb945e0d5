"""Names written into message text ("Bob: text"), as SillyTavern sends group chats."""

from __future__ import annotations

from typing import Any

from proxy.memory.speakers import move_name_prefixes, named_reply

PROMPT = {
    "role": "system",
    "content": "Write Bob Lee's next reply in a fictional chat between Alice, Bob Lee and Tom.",
}


def msgs(*turns: tuple[str, str]) -> list[dict[str, Any]]:
    return [PROMPT, *({"role": role, "content": text} for role, text in turns)]


def test_group_names_move_into_name() -> None:
    messages = msgs(("assistant", "Alice: Hi."), ("user", "Yo."), ("assistant", "Bob Lee: Hm."))
    moved = move_name_prefixes(messages, "Tom")
    assert moved is not None and moved[0] is PROMPT
    assert moved[1:] == [
        {"role": "assistant", "content": "Hi.", "name": "Alice"},
        {"role": "user", "content": "Yo."},  # the user's own messages are bare
        {"role": "assistant", "content": "Hm.", "name": "Bob Lee"},
    ]
    assert messages[1] == {"role": "assistant", "content": "Alice: Hi."}  # not changed


def test_names_in_every_message_move_for_the_user_too() -> None:
    moved = move_name_prefixes(msgs(("assistant", "Bob Lee: Hi."), ("user", "Tom: Yo.")), "Tom")
    assert moved is not None
    assert [(m.get("name"), m["content"]) for m in moved[1:]] == [
        ("Bob Lee", "Hi."),
        ("Tom", "Yo."),
    ]


def test_left_alone_unless_every_reply_is_named() -> None:
    # One bare reply, an unknown name, a `name` field, no main prompt, nothing said yet.
    assert (
        move_name_prefixes(msgs(("assistant", "Alice: Hi."), ("assistant", "Hm.")), "Tom") is None
    )
    assert move_name_prefixes(msgs(("assistant", "Note: the door is shut.")), "Tom") is None
    named = [PROMPT, {"role": "assistant", "content": "Alice: Hi.", "name": "Alice"}]
    assert move_name_prefixes(named, "Tom") is None
    assert move_name_prefixes([{"role": "assistant", "content": "Alice: Hi."}], "Tom") is None
    assert move_name_prefixes(msgs(("user", "Tom: Yo.")), "Tom") is None


def test_named_reply() -> None:
    reply = {"role": "assistant", "content": "Bob: Fine."}
    assert named_reply(reply, "Bob") == {"role": "assistant", "content": "Fine.", "name": "Bob"}
    bare = {"role": "assistant", "content": "Fine."}
    assert named_reply(bare, "Bob") == {"role": "assistant", "content": "Fine.", "name": "Bob"}
    thinking = {"role": "assistant", "content": "<think>Bob speaks.</think>\nBob: Fine."}
    assert named_reply(thinking, "Bob")["content"] == "Fine."
    tools = {"role": "assistant", "content": None, "tool_calls": []}
    assert named_reply(tools, "Bob") == {**tools, "name": "Bob"}
