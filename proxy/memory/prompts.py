"""What the proxy asks the memory model, as templates that config can override ([prompts]).

`{{char}}` and `{{user}}` are the names of the character and the user, as everywhere
else; each template has a few more placeholders of its own, named in `DESCRIPTIONS`.
The prompts are written for small local models (a 1-8B model should follow them):
short, concrete, one task each, and they end with the JSON shape to answer in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompts:
    """Every prompt of the background LLM work."""

    summary_system: str
    summary_user: str
    facts_system: str
    facts_user: str
    reflect_system: str
    reflect_user: str
    retry: str


DEFAULT_PROMPTS = Prompts(
    summary_system=(
        "You keep the running summary of a long conversation between {{char}} and "
        "{{user}}, and update it with new messages. Write in the third person and the "
        "past tense, always with names (never 'the user' or 'the assistant'), and give "
        "dates where they matter. Keep who everyone is and how they relate, how they "
        "feel, where they are, what they own, promises and plans, and open threads "
        "(questions not answered yet, things not done yet). Drop small talk. When new "
        "messages change something, the summary says the new state. Use at most "
        "{{words}} words. Answer with only a JSON object: "
        '{"summary": "..."}'
    ),
    summary_user=(
        "Summary so far:\n{{previous}}\n\nNew messages:\n{{messages}}\n\n"
        "Write the updated summary as JSON."
    ),
    facts_system=(
        "You pick out facts worth remembering from a conversation between {{char}} and "
        "{{user}}. A fact is one short sentence that makes sense on its own: use names, "
        "never 'I', 'you', 'he' or 'she'. Good facts: names, relationships, likes and "
        "dislikes, plans, promises, events, places, belongings, changes. Skip greetings "
        "and small talk. Give each fact an importance from 0 (trivial) to 1 (life-"
        "changing) and the numbers of the new messages it comes from. Known facts have "
        "labels (K1, K2...): if a new fact says the same as a known one, set same_as to "
        "its label; if it changes or contradicts a known one (someone moved, changed "
        "their mind, something ended), set updates to its label; otherwise leave both "
        'null. Nothing worth remembering: {"facts": []}. Answer with only JSON.'
    ),
    facts_user=(
        "Known facts:\n{{known}}\n\nEarlier messages (context only):\n{{context}}\n\n"
        "New messages:\n{{messages}}\n\nAnswer as JSON: "
        '{"facts": [{"text": "...", "importance": 0.5, "from": [1], '
        '"same_as": null, "updates": null}]}'
    ),
    reflect_system=(
        "You look for the bigger picture in what is known about {{char}} and {{user}}: "
        "patterns, motives, how they feel about each other, what matters to them. "
        "From the facts given, write at most {{count}} insights: each one sentence with "
        "names, supported by the facts but not just repeating one. Give each an "
        "importance from 0 to 1 and the labels of the facts it rests on. Do not repeat "
        "insights already known. Answer with only JSON."
    ),
    reflect_user=(
        "Facts:\n{{facts}}\n\nInsights already known:\n{{insights}}\n\nAnswer as JSON: "
        '{"insights": [{"text": "...", "importance": 0.7, "because": ["F1", "F2"]}]}'
    ),
    retry=(
        "Your answer could not be used ({{error}}). Answer again with only the JSON "
        "object, nothing before or after it."
    ),
)

DESCRIPTIONS = {
    "summary_system": "Rolling summary, instructions. {{words}}: the length limit in words.",
    "summary_user": "Rolling summary, the request. {{previous}}: the summary so far; "
    "{{messages}}: the messages that left the window, one per line with date and speaker.",
    "facts_system": "Fact extraction, instructions.",
    "facts_user": "Fact extraction, the request. {{known}}: related known facts, labelled "
    "K1, K2...; {{context}}: the messages before; {{messages}}: the new messages, numbered.",
    "reflect_system": "Reflection, instructions. {{count}}: the most insights wanted.",
    "reflect_user": "Reflection, the request. {{facts}}: facts labelled F1, F2...; "
    "{{insights}}: insights already known.",
    "retry": "Sent after an answer that was not usable JSON, before the one retry. "
    "{{error}}: what was wrong.",
}
