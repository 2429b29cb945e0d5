"""Proxy access keys: who is calling, and which scopes are theirs.

With no keys configured the proxy is open (it listens on 127.0.0.1 by default) and
every caller is the same anonymous owner; clients such as SillyTavern then send
`Bearer undefined`, which is ignored. With keys, each key is its own owner: its memory
is invisible to every other key. Owners are stored as a hash, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.errors import Unauthorized


@dataclass(frozen=True)
class Identity:
    """The caller: `owner` keys the scopes it may see; `admin` may see all."""

    owner: str
    admin: bool


ANONYMOUS = Identity(owner="", admin=True)


def owner_of(key: str) -> str:
    """The stored owner id of a key (a hash: the database never holds keys)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class Auth:
    """Checks `Authorization: Bearer <key>` against the configured keys."""

    def __init__(self, keys: Iterable[str], admin_keys: Iterable[str] = ()):
        self._keys = {k: False for k in keys if k}
        self._keys.update({k: True for k in admin_keys if k})

    @property
    def enabled(self) -> bool:
        """Whether any key is configured."""
        return bool(self._keys)

    def identify(self, headers: Mapping[str, str]) -> Identity:
        """The caller's identity; raises Unauthorized (401) for a missing or wrong key."""
        if not self._keys:
            return ANONYMOUS
        presented = bearer_token(headers)
        if presented is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        for key, admin in self._keys.items():
            if hmac.compare_digest(presented.encode(), key.encode()):
                return Identity(owner=owner_of(key), admin=admin)
        raise Unauthorized("invalid API key")


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The bearer token of a request, if any."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
