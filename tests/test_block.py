"""The memory block the model reads, its caps, and where it goes in the prompt."""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterator

import pytest

from proxy.inject.block import BlockInput, Caps, Recalled, build_block, truncate
from proxy.inject.place import place_block
from proxy.inject.templates import DEFAULT_TEMPLATES, Templates, render
from proxy.inject.tokens import TokenCounter, prepare_tiktoken_cache

UTC = datetime.UTC


@pytest.fixture(scope="module")
def counter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenCounter]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        prepare_tiktoken_cache(tmp_path_factory.mktemp("tiktoken"))
        yield TokenCounter()


def at(day: int, hour: int = 12) -> float:
    return datetime.datetime(2026, 11, day, hour, tzinfo=UTC).timestamp()


def memory(memory_id: int, text: str, when: float, score: float, **kw) -> Recalled:
    kw.setdefault("speaker", None)
    kw.setdefault("kind", "turn")
    return Recalled(text=text, at=when, score=score, memory_id=memory_id, **kw)


def build(counter: TokenCounter, caps: Caps | None = None, **inp) -> object:
    inp.setdefault("char", "Mira")
    inp.setdefault("user", "Tom")
    return build_block(BlockInput(**inp), counter, DEFAULT_TEMPLATES, caps or Caps())


def test_memories_are_shown_in_time_order_with_dates_and_speakers(counter):
    ranked = [  # best first, not in time order
        memory(3, "The anchor chain is rusted through.", at(5), 0.9, role="assistant"),
        memory(1, "I was born in\nPort Ellis.", at(3), 0.8, speaker="Tom", role="user"),
        memory(2, "Tom owes the harbour master money.", at(4), 0.7, kind="fact"),
    ]
    block = build(counter, memories=ranked)

    lines = block.text.splitlines()
    shown = [line for line in lines if line.startswith("[2026")]
    assert shown == [
        "[2026-11-03 (Tue)] Tom: I was born in Port Ellis.",
        "[2026-11-04 (Wed)] Tom owes the harbour master money.",
        "[2026-11-05 (Thu)] Mira: The anchor chain is rusted through.",
    ]
    assert [m.memory_id for m in block.included] == [1, 2, 3]
    assert "newer one is right" in block.text
    assert "Mira and Tom" in block.text
    assert block.tokens == counter.count_text(block.text)


def test_dates_follow_the_given_timezone(counter):
    late = at(3, hour=23)
    tokyo = datetime.timezone(datetime.timedelta(hours=9))
    inp = BlockInput(memories=[memory(1, "hello", late, 1.0, role="user")], user="Tom")
    block = build_block(inp, counter, DEFAULT_TEMPLATES, Caps(), tz=tokyo)
    assert "[2026-11-04 (Wed)] Tom: hello" in block.text


def test_nothing_to_say_gives_no_block(counter):
    block = build(counter)
    assert (block.text, block.tokens, block.included, block.sections) == ("", 0, (), {})
    assert build(counter, summary="  \n", notes=[""], scene={"location": " "}).text == ""


def test_caps_are_respected_and_the_best_memories_win(counter):
    ranked = [
        memory(
            i,
            f"Memory number {i} about the voyage and its many storms.",
            at(1 + i % 20),
            1 - i / 100,
        )
        for i in range(60)
    ]
    caps = Caps(summary=60, memories=150, style=40, notes=40, scene=40, total=360)
    block = build(
        counter,
        caps,
        summary="They left Port Ellis at dawn. " * 30,
        memories=ranked,
        style_sample="'You're late,' she said, not looking up. " * 20,
        notes=["Tom is afraid of deep water."] * 10,
        scene={"character": "A navigator. " * 20, "location": "The Gull, at sea", "user": "Tom"},
    )

    assert counter.count_text(block.text) == block.tokens <= caps.total
    for name, tokens in block.sections.items():
        assert tokens <= getattr(caps, name)
    assert set(block.sections) == {"summary", "memories", "style", "notes", "scene"}
    chosen = sorted(m.memory_id for m in block.included)
    assert chosen == list(range(len(chosen)))  # a prefix of the ranking
    assert 0 < len(chosen) < 60


def test_a_tight_total_cap_keeps_notes_before_style(counter):
    block = build(
        counter,
        Caps(total=90),
        notes=["Tom is afraid of deep water."],
        style_sample="'You're late,' she said, not looking up from the charts. " * 10,
    )
    assert "afraid of deep water" in block.text
    assert "style" not in block.sections
    assert block.tokens <= 90


def test_summary_is_cut_at_a_sentence_boundary(counter):
    summary = "They left Port Ellis at dawn. The wind turned at noon! Was the reef near? " * 20
    block = build(counter, Caps(summary=60), summary=summary)
    body = block.text.split("The story so far:\n", 1)[1]
    assert summary.startswith(body)
    assert body.endswith((".", "!", "?"))
    assert block.sections["summary"] <= 60


def test_truncate_falls_back_to_words_then_nothing(counter):
    one_sentence = "word " * 100
    cut = truncate(one_sentence, 10, counter)
    assert cut.endswith("…") and counter.count_text(cut) <= 10
    assert truncate("x" * 500, 3, counter) == ""
    assert truncate("Short.", 10, counter) == "Short."


def test_style_sample_is_labelled_for_voice_only(counter):
    block = build(counter, style_sample="'You're late,' she said.")
    assert "How Mira speaks — an earlier reply, for voice and style only, not content" in block.text
    assert block.text.endswith("'You're late,' she said.")


def test_a_group_members_style_sample_is_labelled_with_its_own_speaker(counter):
    # Alice speaks now; the sample is one of Bob's replies.
    block = build(counter, char="Alice", style_sample="Hmph.", style_speaker="Bob")
    assert "How Bob speaks" in block.text and "How Alice speaks" not in block.text
    assert block.text.endswith("Hmph.")


def test_a_group_chats_block_names_all_its_characters(counter):
    block = build(counter, char="Alice", group=("Alice", "Bob"), notes=["The ship is late."])
    assert "between Alice, Bob and Tom" in block.text
    alone = build(counter, char="Alice", group=("Alice",), notes=["The ship is late."])
    assert "between Alice and Tom" in alone.text


def test_scene_uses_its_slots(counter):
    block = build(
        counter,
        scene={"location": "The Gull, at sea", "character": "A navigator.", "mood": "tense"},
    )
    assert "Mira: A navigator.\nWhere: The Gull, at sea\nmood: tense" in block.text


def test_block_is_deterministic(counter):
    inp = {
        "summary": "They left at dawn.",
        "memories": [memory(i, f"m{i}", at(1 + i), 0.5, role="user") for i in range(5)],
        "notes": ["a note"],
    }
    assert build(counter, **inp) == build(counter, **inp)


def test_templates_can_be_overridden(counter):
    templates = Templates(
        **{**DEFAULT_TEMPLATES.__dict__, "memory_line": "{speaker} said on {date}: {text}"}
    )
    inp = BlockInput(memories=[memory(1, "hi {there}", at(3), 1.0, speaker="Tom")])
    block = build_block(inp, counter, templates, Caps())
    assert "Tom said on 2026-11-03 (Tue): hi {there}" in block.text


def test_render_replaces_known_placeholders_only():
    text = render(
        "{{char}} and {{ User }} meet {{stranger}}.", {"char": "Mira", "user": "{{char}}"}
    )
    assert text == "Mira and {{char}} meet {{stranger}}."


# --- placement -------------------------------------------------------------------


def chat() -> list[dict]:
    return [
        {"role": "system", "content": "main prompt"},
        {"role": "system", "content": "character card"},
        {"role": "assistant", "content": "greeting"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]


def test_depth_one_puts_the_block_before_the_last_user_message():
    messages = chat()
    snapshot = copy.deepcopy(messages)
    placed = place_block(messages, "MEMORY")
    assert placed[-2] == {"role": "system", "content": "MEMORY"}
    assert placed[-1] == {"role": "user", "content": "u2"}
    assert placed[:-2] == messages[:-1]
    assert messages == snapshot  # never mutated


@pytest.mark.parametrize(("depth", "index"), [(0, 6), (1, 5), (2, 4), (4, 2), (5, 2), (99, 2)])
def test_depth_counts_conversation_messages_from_the_end(depth, index):
    placed = place_block(chat(), "MEMORY", depth=depth, role="user")
    assert placed[index] == {"role": "user", "content": "MEMORY"}
    assert len(placed) == 7


def test_the_block_never_splits_a_tool_call_from_its_results():
    messages = [
        {"role": "system", "content": "agent"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]
    placed = place_block(messages, "MEMORY", depth=1)
    assert [m["role"] for m in placed] == ["system", "user", "system", "assistant", "tool"]


def test_merge_into_system_appends_to_the_first_system_message():
    messages = chat()
    snapshot = copy.deepcopy(messages)
    placed = place_block(messages, "MEMORY", merge_into_system=True)
    assert placed[0]["content"] == "main prompt\n\nMEMORY"
    assert placed[1:] == messages[1:]
    assert messages == snapshot

    parts = [{"role": "system", "content": [{"type": "text", "text": "main"}]}]
    merged = place_block(parts, "MEMORY", merge_into_system=True)
    assert merged[0]["content"][-1] == {"type": "text", "text": "MEMORY"}
    assert len(parts[0]["content"]) == 1

    no_system = [{"role": "user", "content": "hi"}]
    assert place_block(no_system, "MEMORY", merge_into_system=True)[0] == {
        "role": "system",
        "content": "MEMORY",
    }


def test_an_empty_block_changes_nothing():
    messages = chat()
    placed = place_block(messages, "")
    assert placed == messages
    assert placed is not messages


def test_a_built_block_placed_into_a_prompt(counter):
    block = build(
        counter, memories=[memory(1, "The reef lies east.", at(2), 1.0, role="assistant")]
    )
    placed = place_block(chat(), block.text)
    assert re.search(r"\[2026-11-02 \(Mon\)\] Mira: The reef lies east\.", placed[-2]["content"])


def test_caps_within_a_small_room_shrink_every_section_in_proportion() -> None:
    caps = Caps(summary=400, memories=800, style=300, notes=200, scene=200, total=1600)
    assert caps.within(1600) is caps and caps.within(5000) is caps
    half = caps.within(800)
    assert half == Caps(summary=200, memories=400, style=150, notes=100, scene=100, total=800)
    assert caps.within(-5).total == 0 and caps.within(0).style == 0
