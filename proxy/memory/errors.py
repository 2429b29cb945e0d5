"""What the memory layer raises when a request cannot be served as asked.

The tree, written down once:

    ValueError
    └── Invalid            the request's content is invalid (400; `param` names the field)
        ├── InvalidScope   a scope name that cannot be used (`proxy.memory.scope`)
        └── CardError      the bytes hold no usable character card (`proxy.memory.importers`)
    LookupError
    └── Missing            what was asked for does not exist in this scope (404)
    Refused                it exists, but its state forbids the change (409)

Every message is written for the user. The memory API turns these, and only these, into
its 4xx answers (`proxy.routes.memory_calls`): any other exception, a `ValueError` from
deep inside a library included, is a bug and answers 500. `Invalid` stays a
`ValueError` so that callers which catch that (the CLI, older code) still do.
"""

from __future__ import annotations


class Invalid(ValueError):
    """The request's content is invalid; `param` names the field when it is known
    (dotted, as the API's validation names it: ``messages.3.seq``)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Missing(LookupError):
    """What was asked for does not exist (in this scope)."""


class Refused(Exception):
    """The change conflicts with the current state (a retracted memory, a taken name)."""
