"""Reading JSON from what small models really write: fences, prose, thinking, Python
literals, trailing commas, bare keys, stray quotes, and answers cut off at max_tokens."""

from __future__ import annotations

import pytest

from proxy.memory.llm_json import JsonNotFound, normalise, parse_json, read_importance

FACTS = {"facts": [{"text": "Tom has a boat.", "importance": 0.5}]}


@pytest.mark.parametrize(
    "answer",
    [
        '{"facts": [{"text": "Tom has a boat.", "importance": 0.5}]}',
        '```json\n{"facts": [{"text": "Tom has a boat.", "importance": 0.5}]}\n```',
        'Here are the facts:\n{"facts": [{"text": "Tom has a boat.", "importance": 0.5}]}\n'
        "Let me know if you need more!",
        "<think>The user said {boat}. Hmm.</think>\n"
        '{"facts": [{"text": "Tom has a boat.", "importance": 0.5}]}',
        "{'facts': [{'text': 'Tom has a boat.', 'importance': 0.5}]}",
        '{"facts": [{"text": "Tom has a boat.", "importance": 0.5,},],}',
        '{facts: [{text: "Tom has a boat.", importance: 0.5}]}',
        "{“facts”: [{“text”: “Tom has a boat.”, “importance”: 0.5}]}",
        '{"facts": [ // one fact\n {"text": "Tom has a boat.", "importance": 0.5}]}',
        '"{\\"facts\\": [{\\"text\\": \\"Tom has a boat.\\", \\"importance\\": 0.5}]}"',
        '{"facts": [{"text": "Tom has a boat.", "importance": 0.5}]} {"facts": []}',
    ],
)
def test_what_small_models_write_reads_as_the_json_they_meant(answer: str) -> None:
    parsed = parse_json(answer)
    assert parsed.value == FACTS and not parsed.truncated


def test_python_literals_and_unescaped_quotes_inside_strings() -> None:
    parsed = parse_json("{'text': 'Tom's boat', 'ok': True, 'why': None, 'said': \"say \"hi\"\"}")
    assert parsed.value == {"text": "Tom's boat", "ok": True, "why": None, "said": 'say "hi"'}


def test_an_answer_cut_off_keeps_whole_elements_and_says_so() -> None:
    parsed = parse_json('{"facts": [{"text": "Tom has a boat."}, {"text": "Tom li')
    assert parsed.value == {"facts": [{"text": "Tom has a boat."}]} and parsed.truncated
    parsed = parse_json('{"summary": "Tom met Mira. They walked to the')
    assert parsed.value == {"summary": "Tom met Mira. They walked to the"} and parsed.truncated


def test_an_object_is_preferred_to_an_earlier_list_in_prose() -> None:
    parsed = parse_json('Facts [1] and [2]:\n{"facts": []}')
    assert parsed.value == {"facts": []}


def test_a_bare_list_is_read_when_there_is_no_object() -> None:
    assert parse_json('[{"text": "Tom has a boat."}]').value == [{"text": "Tom has a boat."}]


@pytest.mark.parametrize("answer", ["", "I cannot do that.", "The facts are: Tom has a boat.", "{"])
def test_no_json_is_an_error_that_quotes_the_answer(answer: str) -> None:
    with pytest.raises(JsonNotFound, match="no JSON object"):
        parse_json(answer)


IMPORTANCES = [
    (0.7, 0.7),
    ("0.7", 0.7),
    (7, 0.7),
    (70, 0.7),
    ("high", 0.8),
    (-1, 0.0),
    (1, 1.0),
    (None, 0.5),
    ("very", 0.5),
    (True, 0.5),
    (float("nan"), 0.5),
]


@pytest.mark.parametrize(("value", "expected"), IMPORTANCES)
def test_importance_is_read_on_any_scale_a_model_uses(value: object, expected: float) -> None:
    assert read_importance(value) == pytest.approx(expected)


def test_facts_are_the_same_whatever_their_case_spacing_and_punctuation() -> None:
    assert normalise("Tom  lives in Paris.") == normalise("tom lives in paris")
    assert normalise("Tom lives in Paris.") != normalise("Tom lives in Berlin.")
