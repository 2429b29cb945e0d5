"""Choosing what to inject from recall candidates. Pure: data in, data out.

The store finds candidates two ways (vector KNN and BM25 keyword search inside the
scope); `rank` scores them on one scale, drops what the model already sees, merges
duplicates and returns the best first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.inject.block import Recalled

_SECONDS_PER_DAY = 86_400.0
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Candidate:
    """One memory found by the store. `vector_sim`: cosine, higher = more similar;
    `bm25_rank`: position in the keyword results, 0 = best; None when not found that way."""

    memory_id: int
    kind: str
    text: str
    at: float
    importance: float = 0.5
    vector_sim: float | None = None
    bm25_rank: int | None = None
    source_ids: tuple[int, ...] = ()
    speaker: str | None = None
    role: str | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Weights:
    """Weights of the ranking formula (see `rank`) and its thresholds."""

    similarity: float = 1.0
    keyword: float = 0.5
    recency: float = 0.3
    importance: float = 0.3
    recency_half_life_days: float = 30.0
    min_score: float = 0.0
    # bm25 rank at which the keyword evidence is worth half of a top hit.
    keyword_half_rank: float = 5.0


def rank(
    candidates: Iterable[Candidate],
    *,
    now: float,
    weights: Weights,
    exclude_sources: set[int],
    limit: int,
) -> list[Recalled]:
    """The best `limit` candidates, best first, as `Recalled` with score and components.

    priority = w_sim·similarity + w_kw·keyword + w_rec·recency + w_imp·importance

    - similarity: the cosine clamped to [0, 1]; 0 when not found by vector search;
    - keyword: h / (h + bm25_rank) with h = `keyword_half_rank` (1 for the top hit,
      1/2 at rank h); 0 when not found by keyword search. Both are added, so a
      candidate found both ways outranks one of equal similarity found one way;
    - recency: 0.5 ** (age_days / half_life), 1 for now (and the future); 0 when
      the half-life is not positive (recency off);
    - importance: clamped to [0, 1].

    Dropped: candidates all of whose sources are in `exclude_sources` (the model sees
    them in the kept window; a candidate without sources is never dropped this way)
    and those scoring below `min_score`. Pinned candidates ignore `min_score` and come
    first. Near-duplicates (the same text after normalising case, punctuation and
    spacing, or one contained in the other) merge into the better-scored one, which
    takes the newer date and the union of their sources.
    """
    scored: list[tuple[bool, float, float, int, Candidate, tuple[float, float, float, float]]]
    scored = []
    decay = (
        math.log(0.5) / (weights.recency_half_life_days * _SECONDS_PER_DAY)
        if weights.recency_half_life_days > 0
        else None
    )
    half_rank = max(weights.keyword_half_rank, 1e-9)
    for c in candidates:
        if c.source_ids and exclude_sources.issuperset(c.source_ids):
            continue
        similarity = min(1.0, max(0.0, c.vector_sim)) if c.vector_sim is not None else 0.0
        keyword = half_rank / (half_rank + max(0, c.bm25_rank)) if c.bm25_rank is not None else 0.0
        recency = math.exp(decay * max(0.0, now - c.at)) if decay is not None else 0.0
        importance = min(1.0, max(0.0, c.importance))
        score = (
            weights.similarity * similarity
            + weights.keyword * keyword
            + weights.recency * recency
            + weights.importance * importance
        )
        if score < weights.min_score and not c.pinned:
            continue
        scored.append(
            (c.pinned, score, c.at, c.memory_id, c, (similarity, keyword, recency, importance))
        )

    # Best first; ties go to the newer memory, then the lower id (deterministic).
    scored.sort(key=lambda s: (not s[0], -s[1], -s[2], s[3]))

    chosen: list[_Chosen] = []
    for pinned, score, _, _, c, parts in scored:
        key = _normalise(c.text)
        twin = next((ch for ch in chosen if _same(key, ch.key)), None)
        if twin is not None:
            twin.absorb(c)
            continue
        if len(chosen) >= limit:
            # Later candidates could still be duplicates of chosen ones (and lend them a
            # newer date), but they would not change what is shown; stop here.
            break
        chosen.append(_Chosen(key, c, score, pinned, parts))
    return [ch.recalled() for ch in chosen]


class _Chosen:
    """A chosen candidate, with what it absorbed from its duplicates."""

    def __init__(
        self,
        key: str,
        candidate: Candidate,
        score: float,
        pinned: bool,
        parts: tuple[float, float, float, float],
    ) -> None:
        self.key = key
        self.candidate = candidate
        self.score = score
        self.pinned = pinned
        self.parts = parts
        self.at = candidate.at
        self.sources = dict.fromkeys(candidate.source_ids)  # ordered set
        self.merged = 0

    def absorb(self, other: Candidate) -> None:
        self.at = max(self.at, other.at)
        self.sources.update(dict.fromkeys(other.source_ids))
        self.merged += 1

    def recalled(self) -> Recalled:
        c = self.candidate
        similarity, keyword, recency, importance = self.parts
        components = {
            "similarity": similarity,
            "keyword": keyword,
            "recency": recency,
            "importance": importance,
        }
        if self.pinned:
            components["pinned"] = 1.0
        if self.merged:
            components["merged"] = float(self.merged)
        return Recalled(
            text=c.text,
            speaker=c.speaker,
            at=self.at,
            kind=c.kind,
            score=self.score,
            memory_id=c.memory_id,
            source_ids=tuple(self.sources),
            role=c.role,
            components=components,
        )


def _normalise(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


def _same(a: str, b: str) -> bool:
    if not a or not b:
        return a == b
    # Whole words only: "cat" is not a duplicate of "concatenate".
    a, b = f" {a} ", f" {b} "
    return a in b or b in a
