"""The style sample: the character's first reply, kept so that its voice survives.

A long chat drifts: after a few hundred turns the character no longer sounds like the
card. The first assistant message of a scope (in SillyTavern, the card's greeting) is
the purest example of the voice, so it is captured once, automatically, and shown to
the model as "how {{char}} speaks" from the moment it has left the prompt's window.
A sample set by hand (the memory API, a character card) is never replaced by a
capture, and a captured sample whose message is undone (a swiped first reply) goes,
so that the next first reply is captured instead.
"""

from __future__ import annotations

from collections.abc import Set

from proxy.memory import scope_state
from proxy.memory.db import Connection


def capture_style(conn: Connection, scope_id: int, now: float) -> bool:
    """Capture the scope's first assistant message as its sample, if it has none yet
    (never a private one: it has no text to show).

    Returns True when a sample was captured. Run it on the writer (in `Store.write`).
    """
    if scope_state.get_style(conn, scope_id) is not None:
        return False
    row = conn.execute(
        "SELECT id, content FROM messages WHERE scope_id = ? AND role = 'assistant'"
        " AND state = 'active' AND private = 0 AND trim(content) != '' ORDER BY seq LIMIT 1",
        (scope_id,),
    ).fetchone()
    if row is None:
        return False
    return scope_state.set_style(conn, scope_id, row[1], "auto", now, message_id=row[0])


def drop_undone_style(conn: Connection, scope_id: int, undone: Set[int]) -> bool:
    """Forget a captured sample whose message was undone; True if one was dropped."""
    style = scope_state.get_style(conn, scope_id)
    if style is None or style.source != "auto" or style.message_id not in undone:
        return False
    conn.execute("DELETE FROM style WHERE scope_id = ? AND source = 'auto'", (scope_id,))
    return True


def sample_to_show(text: str | None, message_id: int | None, in_window: Set[int]) -> str | None:
    """The sample to inject, or None while its own message is among `in_window`: still
    in the prompt (the model sees the real thing there), or taken back."""
    if not text or (message_id is not None and message_id in in_window):
        return None
    return text
