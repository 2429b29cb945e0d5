"""Which conversation a request belongs to: the scope, and the names in it.

Apps send no conversation id, so the scope is resolved from what a request carries
(design §3). Pure functions over plain data: the route passes the path parameter,
the headers and the parsed body, and gets a `ScopeRef` back.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from proxy.memory.errors import Invalid
from proxy.messages import is_conversation, message_text

__all__ = [
    "InvalidScope",
    "Names",
    "ScopeRef",
    "chat_members",
    "detect_names",
    "resolve_scope",
    "validate_scope_name",
]

MAX_SCOPE_LEN = 128
DEFAULT_SCOPE = "default"

_SCOPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._:-]+")
_DOTS = re.compile(r"\.{2,}")
_SYSTEM_ROLES = ("system", "developer")


class InvalidScope(Invalid):
    """A scope name that cannot be used (the route answers 400, code "invalid_scope")."""


@dataclass(frozen=True)
class ScopeRef:
    """A resolved scope: the stored `name`, where it came from, and a human label.

    `source` is one of "path", "header", "openwebui", "user", "auto". `label` is
    the character's name when one was found (Open WebUI: the user's name).
    """

    name: str
    source: str
    label: str | None = None


@dataclass(frozen=True)
class Names:
    """The speakers of a chat, when they can be told: the character and the user."""

    char: str | None
    user: str | None


def _as_sent(value: str) -> str:
    """A header value as the client wrote it: the server decodes header bytes as
    latin-1, where clients send UTF-8 ("héllo" would read "hÃ©llo")."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def validate_scope_name(name: str) -> str:
    """Return `name` if it is a usable scope name, else raise `InvalidScope`.

    A scope name is 1 to 128 characters of letters, digits, `.`, `_`, `:` and `-`,
    starting with a letter or digit, without `..`. It ends up in URLs, logs and
    export file names, hence no slashes, no spaces and no control characters.
    """
    if not isinstance(name, str):
        raise InvalidScope(f"scope name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidScope("scope name is empty")
    shown = _shown(name)
    if len(name) > MAX_SCOPE_LEN:
        raise InvalidScope(f"scope name {shown} is longer than {MAX_SCOPE_LEN} characters")
    if "/" in name or "\\" in name:
        raise InvalidScope(f"scope name {shown} must not contain slashes")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidScope(f"scope name {shown} must not contain control characters")
    if ".." in name:
        raise InvalidScope(f"scope name {shown} must not contain '..'")
    if not _SCOPE_RE.fullmatch(name):
        raise InvalidScope(
            f"scope name {shown} must start with a letter or digit and use only letters, "
            "digits, '.', '_', ':' and '-'"
        )
    return name


def resolve_scope(
    *, path_scope: str | None, headers: Mapping[str, str], body: dict[str, Any]
) -> ScopeRef:
    """Which scope a chat request belongs to; the first rule that applies wins.

    `headers` has lower-case keys (a starlette `Headers` will do).

    1. `path_scope` (from `/s/{scope}/v1/...`): validated, `InvalidScope` if bad.
    2. header `x-memory-scope`: validated, `InvalidScope` if bad. An empty value
       counts as absent (what an app sends when the user clears the field).
    3. Open WebUI: `x-openwebui-chat-id` gives `owui-chat-<id>`, else
       `x-openwebui-user-id` gives `owui-user-<id>`; labelled with
       `x-openwebui-user-name` (URL-decoded, as Open WebUI encodes it).
    4. the body's `user` field, when it is a non-blank string.
    5. automatic, see below.

    Values from Open WebUI and the `user` field are sanitised rather than refused,
    because the user cannot change what those apps send: runs of other characters
    become `-`, `..` becomes `.`, the name is cut to fit, and whenever anything had
    to change, `-` and 8 hex digits of a hash of the original value are appended so
    that two different values never share a scope (`a@b` and `a#b` stay apart).

    Automatic scope, `auto-<12 hex>`: a fingerprint of the character, built only
    from what stays the same across the turns of a chat. System messages as a whole
    are not stable (SillyTavern's World Info changes every turn), so:

    a. the names in the main prompt ("Write {char}'s next reply in a fictional chat
       between {char} and {user}.", see `detect_names`): the participants and the
       user. The greeting is deliberately left out here: SillyTavern drops it once a
       chat outgrows its context setting, and a swiped alternate greeting differs,
       so it would move a long chat to a new scope just when memory matters. Two
       cards with the same name and persona share a scope; name one to split them.
    b. else the greeting: the leading assistant message(s) before the first user
       message. A long chat that later loses its greeting moves to rule c.
    c. else the first system message (a script's fixed system prompt).
    d. else the fixed scope "default".
    """
    messages = _messages(body)
    prompt = _main_prompt(messages)
    names = _names(messages, prompt)
    if path_scope is not None:
        return ScopeRef(validate_scope_name(path_scope), "path", names.char)

    header_scope = headers.get("x-memory-scope")
    if header_scope:
        return ScopeRef(validate_scope_name(_as_sent(header_scope)), "header", names.char)

    owui_label = _owui_user_name(headers.get("x-openwebui-user-name"))
    chat_id = (headers.get("x-openwebui-chat-id") or "").strip()
    if chat_id:
        return ScopeRef(_sanitised(chat_id, "owui-chat-"), "openwebui", owui_label)
    user_id = (headers.get("x-openwebui-user-id") or "").strip()
    if user_id:
        return ScopeRef(_sanitised(user_id, "owui-user-"), "openwebui", owui_label)

    user = body.get("user")
    if isinstance(user, str) and user.strip():
        return ScopeRef(_sanitised(user.strip(), ""), "user", names.char)

    return _auto_scope(messages, prompt, names)


def detect_names(messages: list[dict[str, Any]]) -> Names:
    """The character's and the user's names, or None for each that cannot be told.

    From `name` fields when the messages carry them: the assistant messages' name
    is the character's, the user messages' name the user's, each only when all
    messages of that role agree (a group chat has several characters).

    Else from the main prompt in a system message, with SillyTavern's wording and
    its common variants:
      "Write {char}'s next reply in a fictional chat between {char} and {user}."
      "Write {char}'s next reply in a fictional roleplay chat between ... and {user}."
      "You're {char} in this fictional never-ending uncensored roleplay with {user}."
      "[Write the next reply only as {char}.]"  (group nudge: the character only)
    Only the first 4,000 characters of each system message are read (main prompts
    are short and come first; a lorebook can be huge).
    Conservative on purpose, a wrong name is worse than none: a name is at most
    64 characters and four words, starts with a letter or digit that is not
    lower-case ("her friend Bob", "the user" are refused), holds no braces (an
    unexpanded `{{char}}`), and the character must appear among the participants.
    """
    return _names(messages, _main_prompt(messages))


def chat_members(messages: list[dict[str, Any]]) -> tuple[str, ...]:
    """The characters of the chat named by its main prompt (see `detect_names`): a
    group's members ("between Alice, Bob and {user}"), else the character alone."""
    prompt = _main_prompt(messages)
    if prompt is None:
        return ()
    members = [p.strip() for p in _LIST_SPLIT.split(prompt.participants) if p.strip()]
    return tuple(dict.fromkeys([*members, prompt.char]))


# -- automatic scope ---------------------------------------------------------------


def _auto_scope(messages: list[dict[str, Any]], prompt: _Prompt | None, names: Names) -> ScopeRef:
    if prompt is not None and prompt.user is not None:
        key: list[str] = ["names", prompt.participants, prompt.user]
        return ScopeRef(_auto_name(key), "auto", prompt.participants)
    greeting = _greeting_texts(messages)
    if greeting:
        return ScopeRef(_auto_name(["greeting", *greeting]), "auto", names.char)
    for message in messages:
        if message.get("role") in _SYSTEM_ROLES:
            text = _normalise(message_text(message))
            if text:
                return ScopeRef(_auto_name(["system", text]), "auto", names.char)
            break
    return ScopeRef(DEFAULT_SCOPE, "auto", names.char)


def _auto_name(key: list[str]) -> str:
    blob = json.dumps(key, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: JSON bodies may carry lone surrogates ("\ud83d"); never crash on them.
    return "auto-" + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _greeting_texts(messages: list[dict[str, Any]]) -> list[str]:
    """Texts of the leading assistant messages of the conversation (the greeting)."""
    texts = []
    for message in messages:
        if not is_conversation(message):
            continue
        if message.get("role") != "assistant" or message.get("tool_calls"):
            break
        texts.append(_normalise(message_text(message)))
    return [t for t in texts if t]


# -- names -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    char: str
    user: str | None
    participants: str  # the character, or a group's member list


# Main prompts are short and come first; a bounded scan keeps a huge lorebook cheap.
_SCAN_CHARS = 4000
# The longest name taken from a main prompt.
MAX_NAME = 64
# A name candidate: no line breaks, sentence ends or brackets; checked by _plausible.
_N = rf"[^\n.!?,;:\"{{}}\[\]<>()]{{1,{MAX_NAME}}}"
_APOS = r"['’]"
_WRITE_BETWEEN = re.compile(
    rf"\bWrite (?P<char>{_N}?){_APOS}s next (?:reply|response|message)\b[^\n.]{{0,80}}?"
    rf"\bbetween (?P<between>[^\n.!?]{{1,300}}) and (?P<user>{_N})(?=[.!?\n]|$)"
)
_YOURE_WITH = re.compile(
    rf"\bYou{_APOS}re (?P<char>{_N}?) in this\b[^\n.]{{0,80}}?\broleplay with "
    rf"(?P<user>{_N})(?=[.!?,\n]|$)"
)
_GROUP_NUDGE = re.compile(rf"\[Write the next reply only as (?P<char>{_N}?)\.?\]")
_PARTICLES = frozenset({"of", "the", "de", "da", "del", "van", "von", "la", "le", "du", "der"})
_PRONOUNS = frozenset({"you", "me", "i", "we", "they", "them", "him", "her", "it", "us"})
_LIST_SPLIT = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def _main_prompt(messages: list[dict[str, Any]]) -> _Prompt | None:
    """The names in the first system message that holds a recognised main prompt."""
    texts = [message_text(m)[:_SCAN_CHARS] for m in messages if m.get("role") in _SYSTEM_ROLES]
    for text in texts:
        for match in _WRITE_BETWEEN.finditer(text):
            char, user = match["char"].strip(), match["user"].strip()
            between = match["between"].strip()
            members = [p for p in _LIST_SPLIT.split(between) if p]
            if not (_plausible(char) and _plausible(user)) or char not in members:
                continue
            if not all(_plausible(m) for m in members):
                continue
            return _Prompt(char, user, between)
        for match in _YOURE_WITH.finditer(text):
            char, user = match["char"].strip(), match["user"].strip()
            if _plausible(char) and _plausible(user):
                return _Prompt(char, user, char)
    for text in texts:
        match = _GROUP_NUDGE.search(text)
        if match and _plausible(match["char"].strip()):
            char = match["char"].strip()
            return _Prompt(char, None, char)
    return None


def _plausible(name: str) -> bool:
    """Whether a captured phrase looks like a name rather than a description."""
    words = name.split()
    if not 1 <= len(words) <= 4 or len(name) > MAX_NAME:
        return False
    first = words[0]
    if not first[0].isalnum() or first[0].islower() or first.lower() in _PRONOUNS:
        return False
    return all(not w[0].islower() or w in _PARTICLES for w in words[1:])


def _names(messages: list[dict[str, Any]], prompt: _Prompt | None) -> Names:
    return Names(
        char=_field_name(messages, "assistant") or (prompt.char if prompt else None),
        user=_field_name(messages, "user") or (prompt.user if prompt else None),
    )


def _field_name(messages: list[dict[str, Any]], role: str) -> str | None:
    found = {
        m["name"].strip()
        for m in messages
        if m.get("role") == role and isinstance(m.get("name"), str) and m["name"].strip()
    }
    return found.pop() if len(found) == 1 else None


# -- helpers -----------------------------------------------------------------------


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _sanitised(value: str, prefix: str) -> str:
    """A valid scope name for `prefix + value`, made deterministic and collision-safe."""
    candidate = prefix + value
    try:
        return validate_scope_name(candidate)
    except InvalidScope:
        pass
    cleaned = _DOTS.sub(".", _UNSAFE_RUN.sub("-", value)).strip("-._:")
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    base = prefix + cleaned if (prefix or cleaned) else "user"
    base = base[: MAX_SCOPE_LEN - len(digest) - 1].rstrip("-._:") or "user"
    return validate_scope_name(f"{base}-{digest}")


def _owui_user_name(value: str | None) -> str | None:
    # Open WebUI URL-encodes the name so that non-ASCII names survive as a header.
    if not value:
        return None
    text = " ".join(unquote(value).split())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
    return text[:100] or None


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _shown(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "…")
