"""Choosing what to inject from recall candidates. Pure: data in, data out.

The store finds candidates two ways (vector KNN and BM25 keyword search inside the
scope); `rank` scores them on one scale, drops what the model already sees, merges
duplicates and returns the best first.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from proxy.inject.block import Recalled
from proxy.memory.timeq import TimeSpan

_SECONDS_PER_DAY = 86_400.0
# ASCII punctuation and the typographic marks chat text is full of.
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation + "“”‘’«»„—–…¡¿·", " "))


class Candidate(NamedTuple):
    """One memory found by the store. `vector_sim`: cosine, higher = more similar;
    `bm25_rank`: position in the keyword results, 0 = best; None when not found that way.

    A NamedTuple rather than a frozen dataclass: a request builds ~150 of them, and a
    frozen dataclass costs several times as much to construct."""

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
    context_sim: float | None = None  # best similarity among its neighbouring turns


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
    # Weight of lying in the span of time the query names ("last Saturday"), if any.
    time: float = 0.3
    # Weight of the best similarity among a candidate's neighbouring turns.
    context: float = 0.3
    # A memory longer than `length_ref` characters costs more of the block: its score
    # is scaled by (length_ref / length) ** length_norm (0: length plays no part;
    # 1: value per character). See docs/recall.md for the measurements.
    length_norm: float = 0.75
    length_ref: int = 300


def rank(
    candidates: Iterable[Candidate],
    *,
    now: float,
    weights: Weights,
    exclude_sources: set[int],
    limit: int,
    span: TimeSpan | None = None,
) -> list[Recalled]:
    """The best `limit` candidates, best first, as `Recalled` with score and components.

    priority = w_sim·similarity + w_kw·keyword + w_rec·recency + w_imp·importance
               (+ w_time·time when the query names a `span` of time)

    - similarity: the cosine clamped to [0, 1]; 0 when not found by vector search;
    - keyword: h / (h + bm25_rank) with h = `keyword_half_rank` (1 for the top hit,
      1/2 at rank h); 0 when not found by keyword search. Both are added, so a
      candidate found both ways outranks one of equal similarity found one way;
    - recency: 0.5 ** (age_days / half_life), 1 for now (and the future); 0 when
      the half-life is not positive (recency off);
    - importance: clamped to [0, 1];
    - time: 1 inside `span`, halving with each span-length (a day at least) outside it.

    Dropped: candidates all of whose sources are in `exclude_sources` (the model sees
    them in the kept window; a candidate without sources is never dropped this way)
    and those scoring below `min_score`. Pinned candidates ignore `min_score` and come
    first. Near-duplicates (the same text after normalising case, punctuation and
    spacing, or one contained in the other) merge into the better-scored one, which
    takes the newer date and the union of their sources.
    """
    scorer = _Scorer(now, weights, span)
    # Sort keys first so that plain tuple comparison orders them: pinned first, then
    # by score, ties to the newer memory, then the lower id (deterministic).
    scored: list[tuple[bool, float, float, int, int, float]] = []
    candidates = list(candidates)
    for index, c in enumerate(candidates):
        if c.source_ids and exclude_sources.issuperset(c.source_ids):
            continue
        score = scorer.score(c)
        if score < weights.min_score and not c.pinned:
            continue
        scored.append((not c.pinned, -score, -c.at, c.memory_id, index, score))
    scored.sort()

    chosen: list[_Chosen] = []
    for _, _, _, _, index, score in scored:
        c = candidates[index]
        key = _normalise(c.text)
        twin = _twin(key, chosen)
        if twin is not None:
            twin.absorb(c)
            continue
        if len(chosen) >= limit:
            # Lower-ranked duplicates of chosen ones could still lend them a newer date;
            # looking for them would cost a normalisation per remaining candidate.
            break
        chosen.append(_Chosen(key, c, score, scorer.components(c)))
    return [ch.recalled() for ch in chosen]


class _Scorer:
    """The formula of `rank`, with the per-call constants computed once."""

    def __init__(self, now: float, weights: Weights, span: TimeSpan | None = None) -> None:
        self.now = now
        self.w = weights
        days = weights.recency_half_life_days
        self.decay = math.log(0.5) / (days * _SECONDS_PER_DAY) if days > 0 else None
        self.half_rank = max(weights.keyword_half_rank, 1e-9)
        self.span = span if weights.time > 0 else None
        if self.span is not None:
            width = max(self.span.end - self.span.start, _SECONDS_PER_DAY)
            self.span_decay = math.log(0.5) / width

    def timing(self, c: Candidate) -> float:
        """1 inside the query's span of time, halving with each span-length outside."""
        if self.span is None:
            return 0.0
        return math.exp(self.span_decay * self.span.distance(c.at))

    def parts(self, c: Candidate) -> tuple[float, float, float, float]:
        sim = c.vector_sim
        similarity = 0.0 if sim is None or sim < 0.0 else 1.0 if sim > 1.0 else sim
        bm25 = c.bm25_rank
        keyword = (
            0.0 if bm25 is None else self.half_rank / (self.half_rank + (bm25 if bm25 > 0 else 0))
        )
        age = self.now - c.at
        recency = 0.0 if self.decay is None else math.exp(self.decay * age) if age > 0 else 1.0
        imp = c.importance
        importance = 0.0 if imp < 0.0 else 1.0 if imp > 1.0 else imp
        return similarity, keyword, recency, importance

    def score(self, c: Candidate) -> float:
        """The formula of `rank` for one candidate (`parts`, `timing` and `context`
        written out, with the length factor: a request scores ~150 candidates)."""
        w = self.w
        sim = c.vector_sim
        total = 0.0 if sim is None or sim < 0.0 else w.similarity * (1.0 if sim > 1.0 else sim)
        bm25 = c.bm25_rank
        if bm25 is not None:
            total += w.keyword * self.half_rank / (self.half_rank + (bm25 if bm25 > 0 else 0))
        if self.decay is not None:
            age = self.now - c.at
            total += w.recency * (math.exp(self.decay * age) if age > 0 else 1.0)
        imp = c.importance
        total += w.importance * (0.0 if imp < 0.0 else 1.0 if imp > 1.0 else imp)
        if self.span is not None:
            total += w.time * math.exp(self.span_decay * self.span.distance(c.at))
        near = c.context_sim
        if near is not None and near > 0.0:
            total += w.context * (1.0 if near > 1.0 else near)
        length = len(c.text)
        if w.length_norm > 0 and length > w.length_ref:
            total *= (w.length_ref / length) ** w.length_norm
        return total

    def context(self, c: Candidate) -> float:
        sim = c.context_sim
        return 0.0 if sim is None or sim < 0.0 else 1.0 if sim > 1.0 else sim

    def components(self, c: Candidate) -> dict[str, float]:
        similarity, keyword, recency, importance = self.parts(c)
        parts = {
            "similarity": similarity,
            "keyword": keyword,
            "recency": recency,
            "importance": importance,
        }
        if self.span is not None:
            parts["time"] = self.timing(c)
        if self.w.context > 0:
            parts["context"] = self.context(c)
        if c.pinned:
            parts["pinned"] = 1.0
        return parts


class _Chosen:
    """A chosen candidate, with what it absorbed from its duplicates."""

    def __init__(
        self, key: str, candidate: Candidate, score: float, components: dict[str, float]
    ) -> None:
        self.key = key
        self.candidate = candidate
        self.score = score
        self.components = components
        self.at = candidate.at
        self.sources = dict.fromkeys(candidate.source_ids)  # an ordered set
        self.merged = 0

    def absorb(self, other: Candidate) -> None:
        self.at = max(self.at, other.at)
        self.sources.update(dict.fromkeys(other.source_ids))
        self.merged += 1

    def recalled(self) -> Recalled:
        c = self.candidate
        components = dict(self.components)
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


@functools.lru_cache(maxsize=2048)
def _normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces; padded for word containment.

    Cached: a chat's requests recall many of the same memories, and normalising one
    costs more than looking it up. 2048 texts (a request ranks ~150) hold a few MB."""
    return f" {' '.join(text.casefold().translate(_PUNCTUATION).split())} "


def _twin(key: str, chosen: list[_Chosen]) -> _Chosen | None:
    """The first of `chosen` whose text `key` duplicates: the same text, or one
    contained in the other as whole words ("cat" is not in "concatenate"). Keys come
    from `_normalise`, padded with spaces; an empty text duplicates only another empty
    one. (Written out for speed: ~800 pairs are compared per request.)"""
    if len(key) <= 2:
        return next((ch for ch in chosen if ch.key == key), None)
    for ch in chosen:
        other = ch.key
        if key in other or (other in key and len(other) > 2):
            return ch
    return None
