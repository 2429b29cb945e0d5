"""Time in a question: spans relative to the request's now."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.memory.timeq import DAY, TimeSpan, find_span

NOW = datetime(2023, 3, 9, 12, 0, tzinfo=UTC).timestamp()  # a Thursday


def day(y: int, m: int, d: int) -> float:
    return datetime(y, m, d, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("What did I buy yesterday?", day(2023, 3, 8), day(2023, 3, 9)),
        ("and the day before yesterday?", day(2023, 3, 7), day(2023, 3, 8)),
        ("Who gave me jewelry last Saturday?", day(2023, 3, 4), day(2023, 3, 5)),
        ("What did I do last Thursday?", day(2023, 3, 2), day(2023, 3, 3)),
        ("the meeting on Thursday", day(2023, 3, 9), day(2023, 3, 10)),
        ("Which airline did I fly with on Valentine's Day?", day(2023, 2, 14), day(2023, 2, 15)),
        ("What did we eat at Christmas?", day(2022, 12, 25), day(2022, 12, 26)),
        ("the first BBQ in June", day(2022, 6, 1), day(2022, 7, 1)),
        ("what happened in February", day(2023, 2, 1), day(2023, 3, 1)),
        ("in March 2021", day(2021, 3, 1), day(2021, 4, 1)),
        ("on March 3rd", day(2023, 3, 3), day(2023, 3, 4)),
        ("on 12 December", day(2022, 12, 12), day(2022, 12, 13)),
        ("last month", day(2023, 2, 1), day(2023, 3, 1)),
        ("this month", day(2023, 3, 1), day(2023, 3, 10)),
        ("last week", day(2023, 2, 27), day(2023, 3, 6)),
        ("last year", day(2022, 1, 1), day(2023, 1, 1)),
    ],
)
def test_calendar_spans(text: str, start: float, end: float) -> None:
    span = find_span(text, NOW)
    assert span is not None
    assert (span.start, span.end) == (start, end)


def test_ago_is_a_span_around_the_point_with_half_a_unit_of_slack() -> None:
    span = find_span("I visited a museum two months ago.", NOW)
    assert span is not None
    middle = (span.start + span.end) / 2
    assert middle == pytest.approx(NOW - 2 * 30.44 * DAY)
    assert span.end - span.start == pytest.approx(30.44 * DAY)
    days = find_span("3 days ago", NOW)
    assert days is not None and days.end - days.start == pytest.approx(2 * DAY)
    assert find_span("a couple of weeks ago", NOW).phrase == "a couple of weeks ago"  # type: ignore[union-attr]


def test_past_n_reaches_now() -> None:
    span = find_span("What did I cook in the past two weeks?", NOW)
    assert span is not None
    assert span.start == pytest.approx(NOW - 14 * DAY)
    assert span.end > NOW


@pytest.mark.parametrize(
    "text",
    [
        "How many weeks ago did I start the course?",  # asks for a time, names none
        "May I ask you something?",
        "What is my favourite colour?",
        "",
    ],
)
def test_no_span(text: str) -> None:
    assert find_span(text, NOW) is None


def test_distance() -> None:
    span = TimeSpan(100.0, 200.0, "x")
    assert span.distance(150) == 0 and span.distance(50) == 50 and span.distance(250) == 50


def test_a_february_29th_that_does_not_exist_is_no_span() -> None:
    assert find_span("on February 29th, 2023", NOW) is None
