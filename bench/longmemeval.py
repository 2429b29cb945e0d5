"""LongMemEval for the recall benchmark: loading, the stratified subset, SillyTavern
conversion and scoring. Pure helpers, no proxy and no I/O beyond reading the data file.

The data (LongMemEval, MIT; Wu et al. 2024) is a JSON list of questions, each with
``question_id``, ``question_type`` (six types; ids ending ``_abs`` are abstention
questions), ``question``, ``question_date``, ``answer``, ``answer_session_ids`` and the
haystack: ``haystack_sessions`` (lists of ``{"role", "content", "has_answer"?}`` turns),
``haystack_dates`` and ``haystack_session_ids``. Turns marked ``has_answer`` are the
evidence.

Scoring reads only what the upstream received (the prompt's text):

- a turn is *present* when any of its pieces appears in the prompt, whitespace
  collapsed. A piece is what the proxy stores as one memory (`split_text`: turns
  longer than ~800 characters are cut at sentence ends); evidence turns are short
  (median 292 characters), so nearly always a turn is one piece;
- turn level: ``turn_all`` (every evidence turn present), ``turn_any`` (at least one);
- session level: ``session_any`` (a turn of at least one answer session present),
  ``session_all`` (a turn of every answer session present). A session counts through
  any of its turns, evidence or not.

Questions without evidence turns (most abstention questions) are not scored; they are
still asked, and their injected tokens are counted.
"""

from __future__ import annotations

import json
import lzma
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.memory.record import split_text

TYPES = (
    "single-session-user",
    "single-session-assistant",
    "single-session-preference",
    "multi-session",
    "knowledge-update",
    "temporal-reasoning",
)
USER_NAME = "User"
CHAR_NAME = "Assistant"
# Turns of one session are dated one second apart, in order, from the session's date.
TURN_STEP = timedelta(seconds=1)


def load(path: str | Path) -> list[dict[str, Any]]:
    """The questions of a LongMemEval file (``.json`` or ``.json.xz``)."""
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def stratify(
    questions: Sequence[dict[str, Any]], size: int, *, seed: int = 0, minimum: int | None = None
) -> list[str]:
    """A fixed, seeded subset of ``size`` question ids across the question types.

    Each type gets a share proportional to its count in ``questions`` but at least
    ``minimum`` (default: a tenth of ``size``, 10 of 100), or all it has; the rest goes
    by largest remainder. Within a type the questions are taken in a seeded shuffled
    order (abstention questions included, as they come), so that for one seed a
    smaller subset takes a prefix of each type's order: subsets nest as long as each
    type's share does not shrink. Returned in the order of ``questions``.
    """
    by_type: dict[str, list[str]] = defaultdict(list)
    for q in questions:
        by_type[q["question_type"]].append(q["question_id"])
    if size >= len(questions):
        return [q["question_id"] for q in questions]
    if minimum is None:
        minimum = size // 10
    counts = {t: len(ids) for t, ids in by_type.items()}
    alloc = {t: min(minimum, n) for t, n in counts.items()}
    left = size - sum(alloc.values())
    if left < 0:
        raise ValueError(f"a subset of {size} cannot hold {minimum} of each type")
    rest = {t: n - alloc[t] for t, n in counts.items()}
    total_rest = sum(rest.values())
    shares = {t: left * r / total_rest for t, r in rest.items()} if total_rest else {}
    for t, share in shares.items():
        alloc[t] += int(share)
    remaining = size - sum(alloc.values())
    for t in sorted(shares, key=lambda t: (-(shares[t] - int(shares[t])), t))[:remaining]:
        alloc[t] += 1
    chosen: set[str] = set()
    for t, ids in by_type.items():
        order = sorted(ids)
        random.Random(f"{seed}:{t}").shuffle(order)
        chosen.update(order[: alloc[t]])
    return [q["question_id"] for q in questions if q["question_id"] in chosen]


def parse_date(text: str) -> datetime:
    """A LongMemEval date, "2023/05/20 (Sat) 07:47", as an aware UTC datetime."""
    day, _, clock = text.partition(")")
    stamp = datetime.strptime(f"{day.split('(')[0].strip()} {clock.strip()}", "%Y/%m/%d %H:%M")
    return stamp.replace(tzinfo=UTC)


@dataclass(frozen=True)
class HaystackTurn:
    """One turn of the haystack as it is imported."""

    session_id: str
    index: int  # within its session
    role: str  # "user" | "assistant"
    text: str
    date: datetime
    evidence: bool


def haystack(question: dict[str, Any]) -> list[HaystackTurn]:
    """The question's haystack in import order (as given: sessions are chronological),
    each turn dated from its session's date. Empty turns are left out, as SillyTavern's
    importer skips them."""
    turns = []
    sessions = zip(
        question["haystack_session_ids"],
        question["haystack_dates"],
        question["haystack_sessions"],
        strict=True,
    )
    for session_id, date, session in sessions:
        start = parse_date(date)
        for index, turn in enumerate(session):
            if not turn["content"].strip():
                continue
            turns.append(
                HaystackTurn(
                    session_id=session_id,
                    index=index,
                    role=turn["role"],
                    text=turn["content"],
                    date=start + index * TURN_STEP,
                    evidence=bool(turn.get("has_answer")),
                )
            )
    return turns


def to_sillytavern(turns: Iterable[HaystackTurn]) -> str:
    """A SillyTavern chat file (JSONL: a header line, then one message a line)."""
    turns = list(turns)
    created = turns[0].date if turns else datetime(2000, 1, 1, tzinfo=UTC)
    lines = [
        json.dumps(
            {
                "user_name": USER_NAME,
                "character_name": CHAR_NAME,
                "create_date": _iso(created),
                "chat_metadata": {},
            }
        )
    ]
    for turn in turns:
        user = turn.role == "user"
        lines.append(
            json.dumps(
                {
                    "name": USER_NAME if user else CHAR_NAME,
                    "is_user": user,
                    "is_system": False,
                    "send_date": _iso(turn.date),
                    "mes": turn.text,
                }
            )
        )
    return "\n".join(lines)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def collapse(text: str) -> str:
    """Whitespace collapsed, as the memory block writes each memory on one line."""
    return " ".join(text.split())


def present(turn_text: str, prompt: str) -> bool:
    """Whether any stored piece of a turn appears in ``prompt`` (already collapsed)."""
    return any(collapse(piece) in prompt for piece in split_text(turn_text))


def score(question: dict[str, Any], prompt: str) -> dict[str, Any] | None:
    """Turn- and session-level recall of one question from the prompt text the upstream
    received; None when the question has no evidence turn (not scored)."""
    turns = haystack(question)
    evidence = [t for t in turns if t.evidence]
    if not evidence:
        return None
    text = collapse(prompt)
    found_evidence = [present(t.text, text) for t in evidence]
    answer_sessions = set(question["answer_session_ids"])
    hit_sessions = {
        t.session_id for t in turns if t.session_id in answer_sessions and present(t.text, text)
    }
    known = {t.session_id for t in turns} & answer_sessions
    return {
        "evidence_turns": len(evidence),
        "evidence_found": sum(found_evidence),
        "turn_all": all(found_evidence),
        "turn_any": any(found_evidence),
        "answer_sessions": len(known),
        "sessions_found": len(hit_sessions),
        "session_any": bool(hit_sessions),
        "session_all": bool(known) and hit_sessions >= known,
    }


METRICS = ("turn_all", "turn_any", "session_any", "session_all")


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each metric per question type and overall ("all"), over scored rows
    (``row["score"]`` not None), with ``n`` and the mean injected tokens over all rows."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["type"]].append(row)
        groups["all"].append(row)
    out: dict[str, dict[str, float]] = {}
    for name, items in groups.items():
        scored = [r["score"] for r in items if r["score"] is not None]
        entry: dict[str, float] = {"n": len(scored), "asked": len(items)}
        for metric in METRICS:
            entry[metric] = sum(s[metric] for s in scored) / len(scored) if scored else 0.0
        entry["tokens"] = sum(r["block_tokens"] for r in items) / len(items)
        out[name] = entry
    return out
