"""The LongMemEval helpers of bench/recall.py: conversion, subset and scoring, on a tiny
synthetic haystack (no shared data)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bench import longmemeval as lme
from proxy.memory.importers.sillytavern import parse_chat
from proxy.memory.record import split_text

LONG = " ".join(f"Sentence number {i} is about the weather in Lisbon." for i in range(40))


def question(**changes: object) -> dict:
    q = {
        "question_id": "q1",
        "question_type": "multi-session",
        "question": "Where did I go?",
        "question_date": "2023/05/30 (Tue) 10:18",
        "answer": "Lisbon",
        "answer_session_ids": ["s2", "s3"],
        "haystack_session_ids": ["s1", "s2", "s3"],
        "haystack_dates": [
            "2023/05/20 (Sat) 07:47",
            "2023/05/21 (Sun) 12:00",
            "2023/05/25 (Thu) 23:59",
        ],
        "haystack_sessions": [
            [
                {"role": "user", "content": "Hello there."},
                {"role": "assistant", "content": "Hi!\n\nHow can I help?"},
            ],
            [
                {"role": "user", "content": "I flew to  Lisbon\nlast week.", "has_answer": True},
                {"role": "assistant", "content": LONG},
            ],
            [
                {"role": "user", "content": "   "},
                {"role": "user", "content": "Then I took the train to Porto.", "has_answer": True},
            ],
        ],
    }
    q.update(changes)
    return q


def test_parse_date_is_utc() -> None:
    assert lme.parse_date("2023/05/20 (Sat) 07:47") == datetime(2023, 5, 20, 7, 47, tzinfo=UTC)


def test_haystack_dates_turns_in_order_and_skips_empty_ones() -> None:
    turns = lme.haystack(question())
    assert [t.session_id for t in turns] == ["s1", "s1", "s2", "s2", "s3"]
    assert [t.evidence for t in turns] == [False, False, True, False, True]
    assert turns[1].date == datetime(2023, 5, 20, 7, 47, 1, tzinfo=UTC)
    assert turns[4].index == 1  # the empty turn kept its place in the numbering


def test_sillytavern_conversion_reads_back_through_the_proxy_importer() -> None:
    turns = lme.haystack(question())
    chat = parse_chat(lme.to_sillytavern(turns).splitlines())
    assert not chat.errors and not chat.warnings
    assert chat.user_name == "User" and chat.character_name == "Assistant"
    assert [(m.role, m.name, m.text) for m in chat.messages] == [
        (
            "user" if t.role == "user" else "assistant",
            "User" if t.role == "user" else "Assistant",
            t.text,
        )
        for t in turns
    ]
    assert [m.date for m in chat.messages] == [t.date.timestamp() for t in turns]


def prompt_with(*texts: str) -> str:
    lines = [f"[2023-05-21] User: {' '.join(t.split())}" for t in texts]
    return "Relevant memories:\n" + "\n".join(lines) + "\n\nWhere did I go?"


def test_score_all_present() -> None:
    s = lme.score(
        question(), prompt_with("I flew to Lisbon last week.", "Then I took the train to Porto.")
    )
    assert s is not None
    assert s["turn_all"] and s["turn_any"] and s["session_all"] and s["session_any"]
    assert (s["evidence_turns"], s["evidence_found"]) == (2, 2)


def test_score_whitespace_is_collapsed_and_one_turn_missing() -> None:
    s = lme.score(question(), prompt_with("I flew to Lisbon last week."))
    assert s is not None
    assert not s["turn_all"] and s["turn_any"]
    assert s["session_any"] and not s["session_all"]


def test_a_long_turn_counts_through_any_of_its_pieces() -> None:
    pieces = split_text(LONG)
    assert len(pieces) > 1
    s = lme.score(question(), prompt_with(pieces[-1]))
    assert s is not None
    # The long assistant turn is in session s2 but is no evidence turn.
    assert s["session_any"] and not s["turn_any"]
    assert s["sessions_found"] == 1


def test_a_partial_piece_does_not_count() -> None:
    s = lme.score(question(), prompt_with("I flew to Lisbon"))
    assert s is not None and not s["turn_any"] and not s["session_any"]


def test_questions_without_evidence_are_not_scored() -> None:
    sessions = question()["haystack_sessions"]
    plain = [[{k: v for k, v in t.items() if k != "has_answer"} for t in s] for s in sessions]
    assert lme.score(question(haystack_sessions=plain), "anything") is None


def test_aggregate_means_per_type_and_overall() -> None:
    hit = {m: True for m in lme.METRICS}
    miss = {m: False for m in lme.METRICS}
    rows = [
        {"type": "a", "score": hit, "block_tokens": 100},
        {"type": "a", "score": miss, "block_tokens": 300},
        {"type": "b", "score": None, "block_tokens": 50},
    ]
    out = lme.aggregate(rows)
    assert out["a"]["turn_all"] == 0.5 and out["a"]["n"] == 2 and out["a"]["tokens"] == 200
    assert out["b"]["n"] == 0 and out["b"]["asked"] == 1
    assert out["all"]["n"] == 2 and out["all"]["tokens"] == 150


def synthetic(counts: dict[str, int]) -> list[dict]:
    return [
        {"question_id": f"{t}-{i}", "question_type": t} for t, n in counts.items() for i in range(n)
    ]


def test_stratify_is_seeded_proportional_with_a_minimum() -> None:
    qs = synthetic({"big": 300, "mid": 100, "small": 12})
    ids = lme.stratify(qs, 60, seed=0, minimum=10)
    assert len(ids) == 60 and len(set(ids)) == 60
    per = {t: sum(i.startswith(f"{t}-") for i in ids) for t in ("big", "mid", "small")}
    assert per["small"] >= 10 and per["big"] > per["mid"] > per["small"]
    assert lme.stratify(qs, 60, seed=0, minimum=10) == ids
    assert lme.stratify(qs, 60, seed=1, minimum=10) != ids
    assert ids == [q["question_id"] for q in qs if q["question_id"] in set(ids)]


def test_stratify_refuses_a_subset_too_small_for_the_minimum() -> None:
    with pytest.raises(ValueError):
        lme.stratify(synthetic({"a": 50, "b": 50}), 10, minimum=10)
