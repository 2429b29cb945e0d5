"""The prompt is trimmed to the window without losing what must stay."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from proxy.inject.budget import compute_budget, trim_history
from proxy.inject.tokens import TokenCounter, prepare_tiktoken_cache


@pytest.fixture(scope="module")
def counter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenCounter]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        prepare_tiktoken_cache(tmp_path_factory.mktemp("tiktoken"))
        yield TokenCounter()


def sillytavern_chat(turns: int) -> list[dict]:
    """The layout SillyTavern sends: several system messages, a greeting, then turns."""
    messages = [
        {"role": "system", "content": "Write Mira's next reply in a fictional chat with Tom."},
        {"role": "system", "content": "Mira is a ship's navigator, dry-humoured and exact."},
        {"role": "system", "content": "[Start a new Chat]"},
        {"role": "assistant", "content": "Mira looks up from the charts. 'You're late.'"},
    ]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Turn {i}: what do the charts say? " * 5})
        messages.append({"role": "assistant", "content": f"Reply {i}: the reef lies east. " * 8})
    messages.append({"role": "user", "content": "And where do we anchor tonight?"})
    return messages


@pytest.mark.parametrize(
    ("window", "max_tokens", "default_reply", "margin", "reply", "available"),
    [
        (8192, 512, 1024, 256, 512, 7424),  # the request's max_tokens wins
        (8192, None, 1024, 256, 1024, 6912),  # else the default reply size
        (8192, 0, 1024, 256, 1024, 6912),  # 0 is "not given"
        (4096, 4096, 1024, 256, 2048, 1792),  # a max_tokens as big as the window
        (1000, None, 400, 900, 400, 0),  # a huge margin cannot go negative
        (0, 100, 100, 100, 0, 0),
    ],
)
def test_budget_is_never_negative(window, max_tokens, default_reply, margin, reply, available):
    budget = compute_budget(window, max_tokens, default_reply, margin)
    assert budget.reply == reply
    assert budget.available == available
    assert budget.window - budget.reply - budget.margin == budget.available >= 0


def test_a_chat_that_fits_is_left_alone(counter):
    messages = sillytavern_chat(3)
    trim = trim_history(messages, counter, available=100_000)
    assert trim.messages == messages
    assert trim.dropped == ()
    assert trim.kept == tuple(range(len(messages)))
    assert trim.fits
    assert trim.tokens == counter.count_messages(messages)


def test_oldest_turns_go_first_and_the_result_fits(counter):
    messages = sillytavern_chat(30)
    available = counter.count_messages(messages) // 3
    trim = trim_history(messages, counter, available, reserve=200)

    assert trim.fits
    assert trim.tokens == counter.count_messages(trim.messages)
    assert trim.whole == counter.count_messages(messages)  # what the app sent
    assert trim.tokens + 200 <= available
    # System messages and the last user message survive.
    assert [m for m in trim.messages if m["role"] == "system"] == messages[:3]
    assert trim.messages[-1] == messages[-1]
    # What was dropped is one contiguous run of the oldest conversation, greeting first.
    assert trim.dropped[0] == 3
    assert trim.dropped == tuple(range(3, 3 + len(trim.dropped)))
    assert set(trim.kept) | set(trim.dropped) == set(range(len(messages)))
    # Not more than needed: putting back the newest dropped message would overflow.
    one_more = [messages[i] for i in sorted((*trim.kept, trim.dropped[-1]))]
    assert counter.count_messages(one_more) + 200 > available


def test_trimmed_history_starts_with_a_user_message(counter):
    # Chat templates that want user and assistant to alternate (Mistral's, Gemma's)
    # refuse a history that opens with a reply: wherever the cut falls, it moves on.
    messages = sillytavern_chat(10)
    whole = counter.count_messages(messages)
    starts = set()
    for available in range(whole // 4, whole, 7):
        trim = trim_history(messages, counter, available)
        conversation = [m for m in trim.messages if m["role"] != "system"]
        if trim.dropped:
            assert conversation[0]["role"] == "user", available
            starts.add(trim.dropped[-1])
    assert len(starts) > 3  # the cut fell in many places, after replies too


def test_system_and_last_user_message_survive_even_when_nothing_fits(counter):
    messages = sillytavern_chat(5)
    messages[-1] = {"role": "user", "content": "a very long question " * 200}
    trim = trim_history(messages, counter, available=50)

    assert not trim.fits
    assert trim.messages == [*messages[:3], messages[-1]]


def test_system_messages_inside_the_chat_are_kept(counter):
    messages = sillytavern_chat(10)
    authors_note = {"role": "system", "content": "[Author's note: keep it tense.]"}
    messages.insert(8, authors_note)
    trim = trim_history(messages, counter, counter.count_messages(messages) // 2)
    assert authors_note in trim.messages
    assert 7 in trim.dropped  # the turn before it did go


def test_everything_after_the_last_user_message_is_kept(counter):
    messages = sillytavern_chat(10)
    messages.append({"role": "assistant", "content": "Mira points at"})  # a prefill
    trim = trim_history(messages, counter, counter.count_messages(messages) // 3)
    assert trim.messages[-2:] == messages[-2:]


def tool_round(n: int) -> list[dict]:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": f"c{n}a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": f"c{n}b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    results = [
        {"role": "tool", "tool_call_id": f"c{n}a", "content": "result a " * 30},
        {"role": "tool", "tool_call_id": f"c{n}b", "content": "result b " * 30},
    ]
    return [{"role": "user", "content": f"question {n} " * 10}, call, *results]


def test_tool_calls_and_their_results_are_dropped_together(counter):
    messages = [{"role": "system", "content": "You are a helpful agent."}]
    for n in range(6):
        messages += tool_round(n)
        messages.append({"role": "assistant", "content": f"answer {n} " * 10})
    messages.append({"role": "user", "content": "and now?"})
    total = counter.count_messages(messages)

    for available in range(total // 5, total, 37):
        trim = trim_history(messages, counter, available)
        kept_ids = {
            call["id"] for m in trim.messages if m.get("tool_calls") for call in m["tool_calls"]
        }
        for m in trim.messages:
            if m["role"] == "tool":
                assert m["tool_call_id"] in kept_ids
        for m in trim.messages:
            if m.get("tool_calls"):
                answered = {r["tool_call_id"] for r in trim.messages if r["role"] == "tool"}
                assert {c["id"] for c in m["tool_calls"]} <= answered


def test_the_current_tool_round_is_never_cut(counter):
    messages = [{"role": "system", "content": "agent"}, *tool_round(0), *tool_round(1)]
    trim = trim_history(messages, counter, available=10)
    assert trim.messages == [messages[0], *tool_round(1)]


def first_kept_turn(trim) -> int:
    return next(i for i in trim.kept if i >= 3)


def test_slack_keeps_the_head_stable_as_the_chat_grows(counter):
    # The app resends the whole chat each turn; count how often the start of the kept
    # history moves over 20 turns (each move invalidates a local server's prompt cache).
    available = 1500

    def cut_points(slack: int) -> list[int]:
        points = []
        for turns in range(20, 40):
            trim = trim_history(sillytavern_chat(turns), counter, available, slack=slack)
            assert trim.fits
            assert trim.tokens <= available
            points.append(first_kept_turn(trim))
        return points

    exact = cut_points(slack=0)
    stable = cut_points(slack=400)
    assert moves(exact) == len(exact) - 1  # moves every turn
    assert moves(stable) <= len(stable) // 3


def moves(points: list[int]) -> int:
    return sum(a != b for a, b in itertools.pairwise(points))


def test_slack_never_empties_a_small_window(counter):
    messages = sillytavern_chat(10)
    fixed = counter.count_messages([*messages[:3], messages[-1]])
    available = fixed + 300
    trim = trim_history(messages, counter, available, slack=10_000)
    assert trim.fits
    assert len(trim.messages) > 4  # some conversation survives the rounding
