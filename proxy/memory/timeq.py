"""Time in a question: the span of time a message points at ("last Saturday", "two
weeks ago", "in March"), read relative to the request's "now". Pure: text in, span out.

Recall uses the span to prefer memories from that time (`proxy.memory.rank`) and to
look for candidates inside it that plain similarity would miss
(`proxy.memory.recall`). Only English phrases are understood; anything else (and a
message naming no time) gives None, and recall is as it would be without this module.

Understood, case-insensitively, first match wins:

- "today", "yesterday", "the day before yesterday", "last night", "this morning";
- "N days / weeks / months / years ago" (N in digits or words, "a", "a couple of",
  "a few"): a span around that point, half a unit either side (a day at least);
- "last / past / previous week, month, year", "this week, month, year";
- "in / over / during the past / last N days, weeks, months";
- "last Monday" (the latest Monday before today), "on Monday" (the latest Monday,
  today included);
- a month, with or without a day or a year ("in March", "March 3rd", "3 March 2023"):
  the latest such month or day not after now; holidays with a fixed date
  ("Valentine's Day", "Christmas", "Halloween", "New Year's Eve", ...).

Spans are in UTC unless a zone is given (the proxy stores unix times; a user's
calendar day in another zone is at most a day off, which the slack covers).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

DAY = 86_400.0
_UNITS = {"day": 1.0, "week": 7.0, "month": 30.44, "year": 365.25}
_NUMBERS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "a couple of": 2, "a couple": 2, "couple of": 2, "a few": 3, "few": 3, "several": 3,
}  # fmt: skip
_WEEKDAYS = {name: i for i, name in enumerate(
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
)}  # fmt: skip
_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"),
            ("may",), ("june", "jun"), ("july", "jul"), ("august", "aug"),
            ("september", "sept", "sep"), ("october", "oct"), ("november", "nov"),
            ("december", "dec"),
        ),
        start=1,
    )
    for name in names
}  # fmt: skip
_HOLIDAYS = {
    "new year's eve": (12, 31), "new years eve": (12, 31), "new year's day": (1, 1),
    "new years day": (1, 1), "valentine's day": (2, 14), "valentines day": (2, 14),
    "valentine's": (2, 14), "st. patrick's day": (3, 17), "st patrick's day": (3, 17),
    "saint patrick's day": (3, 17), "april fools": (4, 1), "independence day": (7, 4),
    "fourth of july": (7, 4), "4th of july": (7, 4), "july 4th": (7, 4), "halloween": (10, 31),
    "christmas eve": (12, 24), "christmas day": (12, 25), "christmas": (12, 25),
}  # fmt: skip

_NUM = (
    r"(\d+|a couple of|a couple|couple of|a few|few|several|an?|one|two|three|four|five|"
    r"six|seven|eight|nine|ten|eleven|twelve)"
)
_UNIT = r"(day|week|month|year)s?"
_AGO = re.compile(rf"\b{_NUM}\s+{_UNIT}\s+(?:ago|back|earlier)\b")
_PAST_N = re.compile(rf"\b(?:in|over|during|within|for)\s+the\s+(?:past|last)\s+{_NUM}\s+{_UNIT}\b")
_LAST_UNIT = re.compile(r"\b(last|past|previous|this)\s+(week|month|year)\b")
_WEEKDAY = re.compile(
    r"\b(last|on|this|past)\s+(monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b"
)
_MONTH_NAMES = "|".join(sorted(_MONTHS, key=len, reverse=True))
_MONTH_DAY = re.compile(
    rf"\b(?:(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MONTH_NAMES})\.?|({_MONTH_NAMES})\.?\s+"
    rf"(\d{{1,2}})(?:st|nd|rd|th)?\b)(?:,?\s+(\d{{4}}))?"
)
_MONTH = re.compile(
    rf"\b(?:in|during|of|since|early|late|mid|last)[\s-]+({_MONTH_NAMES})\b"
    rf"(?:\s+(\d{{4}}))?"
)
_HOLIDAY = re.compile("|".join(re.escape(h) for h in sorted(_HOLIDAYS, key=len, reverse=True)))


@dataclass(frozen=True)
class TimeSpan:
    """A span of unix time [start, end) a message points at, and the phrase that did."""

    start: float
    end: float
    phrase: str

    def distance(self, at: float) -> float:
        """Seconds from ``at`` to the span (0 inside it)."""
        if at < self.start:
            return self.start - at
        if at >= self.end:
            return at - self.end
        return 0.0


def find_span(text: str, now: float, tz: tzinfo = UTC) -> TimeSpan | None:
    """The span of time ``text`` points at, relative to ``now``; None if it names none."""
    lowered = " ".join(text.casefold().replace("’", "'").split())
    today = datetime.fromtimestamp(now, tz).replace(hour=0, minute=0, second=0, microsecond=0)
    for finder in (_days, _ago, _past_n, _last_unit, _weekday, _holiday, _month_day, _month):
        span = finder(lowered, now, today)
        if span is not None and span.start < span.end:
            return span
    return None


def _span(start: datetime, end: datetime, phrase: str) -> TimeSpan:
    return TimeSpan(start.timestamp(), end.timestamp(), phrase)


def _days(text: str, now: float, today: datetime) -> TimeSpan | None:
    one = timedelta(days=1)
    for phrase, back in (("the day before yesterday", 2), ("yesterday", 1), ("last night", 1),
                         ("today", 0), ("this morning", 0), ("tonight", 0)):  # fmt: skip
        if re.search(rf"\b{phrase}\b", text):
            start = today - back * one
            return _span(start, start + one, phrase)
    return None


def _count(word: str) -> float:
    return float(word) if word.isdigit() else float(_NUMBERS.get(word, 1))


def _ago(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _AGO.search(text)
    if match is None:
        return None
    unit = _UNITS[match.group(2)] * DAY
    point = now - _count(match.group(1)) * unit
    slack = max(DAY, unit / 2)
    return TimeSpan(point - slack, point + slack, match.group(0))


def _past_n(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _PAST_N.search(text)
    if match is None:
        return None
    length = _count(match.group(1)) * _UNITS[match.group(2)] * DAY
    return TimeSpan(now - length, now + DAY, match.group(0))


def _last_unit(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _LAST_UNIT.search(text)
    if match is None:
        return None
    which, unit = match.groups()
    if unit == "week":
        start = today - timedelta(days=today.weekday())
        if which != "this":
            start -= timedelta(days=7)
        end = start + timedelta(days=7)
    elif unit == "month":
        start = today.replace(day=1)
        if which != "this":
            start = (start - timedelta(days=1)).replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        start = today.replace(month=1, day=1)
        if which != "this":
            start = start.replace(year=start.year - 1)
        end = start.replace(year=start.year + 1)
    if which == "this":
        end = today + timedelta(days=1)
    return _span(start, end, match.group(0))


def _weekday(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _WEEKDAY.search(text)
    if match is None:
        return None
    which, name = match.groups()
    back = (today.weekday() - _WEEKDAYS[name]) % 7
    if back == 0 and which in ("last", "past"):
        back = 7
    start = today - timedelta(days=back)
    return _span(start, start + timedelta(days=1), match.group(0))


def _latest(today: datetime, month: int, day: int | None, year: int | None) -> datetime | None:
    """The latest date of that month (and day) not after today, or in that year."""
    if year is None:
        year = today.year
        if (month, day or 1) > (today.month, today.day):
            year -= 1
    last = calendar.monthrange(year, month)[1]
    if day is not None and not 1 <= day <= last:
        return None
    return today.replace(year=year, month=month, day=day or 1)


def _holiday(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _HOLIDAY.search(text)
    if match is None:
        return None
    month, day = _HOLIDAYS[match.group(0)]
    start = _latest(today, month, day, None)
    if start is None:
        return None
    return _span(start, start + timedelta(days=1), match.group(0))


def _month_day(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _MONTH_DAY.search(text)
    if match is None:
        return None
    day = match.group(1) or match.group(4)
    month = _MONTHS[match.group(2) or match.group(3)]
    if match.group(3) == "may" and not match.group(5) and int(day) > 31:
        return None
    year = int(match.group(5)) if match.group(5) else None
    start = _latest(today, month, int(day), year)
    if start is None:
        return None
    return _span(start, start + timedelta(days=1), match.group(0))


def _month(text: str, now: float, today: datetime) -> TimeSpan | None:
    match = _MONTH.search(text)
    if match is None:
        return None
    name, year = match.groups()
    if name == "may" and not year and not match.group(0).startswith(("in ", "during ")):
        return None  # "... since may ..." is too often the verb
    start = _latest(today, _MONTHS[name], None, int(year) if year else None)
    if start is None:
        return None
    end = (start + timedelta(days=32)).replace(day=1)
    return _span(start, end, match.group(0))
