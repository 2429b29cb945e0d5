"""The words the proxy writes for the model, as defaults that config can override.

Templates use `{{name}}` placeholders, the macro syntax character-chat users already
know from SillyTavern: `{{char}}` is the character's name, `{{user}}` the user's.
The one-line formats (`memory_line`, `memory_date`) use single-brace fields that are
filled by `format_fields`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_FIELD = re.compile(r"\{(\w+)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """Replace `{{name}}` placeholders with `values[name]`.

    Names match exactly or case-insensitively (`{{Char}}` works); whitespace inside
    the braces is allowed. Unknown placeholders are left as they are. One pass: a
    value that itself contains `{{...}}` is not expanded again.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in values:
            return values[name]
        lowered = name.lower()
        if lowered in values:
            return values[lowered]
        return match.group(0)

    return _PLACEHOLDER.sub(substitute, template)


def format_fields(template: str, values: Mapping[str, str]) -> str:
    """Replace single-brace `{name}` fields (one pass; unknown fields left as is).

    Unlike `str.format`, stray braces in a configured template or in the values
    (memory texts are user content) can never raise.
    """
    parts = _split_fields(template)
    out = [parts[0]]
    for i in range(1, len(parts), 2):
        value = values.get(parts[i])
        out.append(f"{{{parts[i]}}}" if value is None else value)
        out.append(parts[i + 1])
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _split_fields(template: str) -> tuple[str, ...]:
    """The template as literal, field name, literal, ..., literal (a few templates are
    used for every memory line of every request: split once)."""
    return tuple(_FIELD.split(template))


def _text(help_text: str) -> Any:
    return field(metadata={"help": help_text})


@dataclass(frozen=True)
class Templates:
    """Every text the memory block is made of. Each field is one template string;
    `help` in its metadata says what it is (config.toml shows it)."""

    block_header: str = _text(
        "Opens the memory block: what it is, that it is dated, how to use it. In a group "
        "chat {{char}} here is every character of the group."
    )
    scene_header: str = _text("Header of the scene section (character, place, the user's name).")
    notes_header: str = _text("Header of the pinned notes, which are always shown.")
    summary_header: str = _text("Header of the rolling summary.")
    memories_header: str = _text("Header of the retrieved memories.")
    style_header: str = _text("Header of the style sample (an earlier reply of the character).")
    memory_line: str = _text("One remembered item: fields {date}, {speaker}, {text}.")
    memory_line_unattributed: str = _text(
        "One remembered item with no known speaker (a fact, a summary): {date}, {text}."
    )
    memory_date: str = _text("How a date is written: {date} (YYYY-MM-DD) and {weekday} (Mon..Sun).")
    note_line: str = _text("One pinned note: field {text}.")
    scene_character: str = _text("Scene line of the character's description: {{value}}.")
    scene_location: str = _text("Scene line of the current place: {{value}}.")
    scene_user: str = _text("Scene line of the user's name: {{value}}.")
    scene_other: str = _text("Any other scene line: {{key}} and {{value}}.")


DEFAULT_TEMPLATES = Templates(
    block_header=(
        "[Memory: notes from earlier parts of this conversation between {{char}} and "
        "{{user}}, with their dates. Use them when they are relevant to the reply; do "
        "not mention that they are notes. When two of them disagree, the newer one is "
        "right.]"
    ),
    scene_header="Scene:",
    notes_header="Always keep in mind:",
    summary_header="The story so far:",
    memories_header="Remembered from earlier (oldest first):",
    style_header="How {{char}} speaks — an earlier reply, for voice and style only, not content:",
    memory_line="[{date}] {speaker}: {text}",
    memory_line_unattributed="[{date}] {text}",
    memory_date="{date} ({weekday})",
    note_line="- {text}",
    scene_character="{{char}}: {{value}}",
    scene_location="Where: {{value}}",
    scene_user="{{char}} is talking with {{value}}.",
    scene_other="{{key}}: {{value}}",
)
