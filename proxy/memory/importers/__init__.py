"""Importers: other apps' files (SillyTavern chats, character cards) as plain data.

Pure parsers, no I/O and no store: the caller reads the file, hands over its bytes or
lines, and records what comes back (`proxy.memory.record`).
"""

from __future__ import annotations

from proxy.memory.importers.cards import (
    BookEntry,
    Card,
    CardError,
    card_from_json,
    card_placeholders,
    parse_card,
)
from proxy.memory.importers.sillytavern import (
    ChatHeader,
    LineError,
    LineWarning,
    ParsedChat,
    ParsedMessage,
    iter_chat,
    parse_chat,
    parse_st_date,
)

__all__ = [
    "BookEntry",
    "Card",
    "CardError",
    "ChatHeader",
    "LineError",
    "LineWarning",
    "ParsedChat",
    "ParsedMessage",
    "card_from_json",
    "card_placeholders",
    "iter_chat",
    "parse_card",
    "parse_chat",
    "parse_st_date",
]
