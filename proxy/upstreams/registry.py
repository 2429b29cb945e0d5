"""Which upstream serves a model: explicit routes, then model lists, then prefixes, then default."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.errors import ModelNotFound


@dataclass(frozen=True)
class Upstream:
    """One model server, as the rest of the proxy sees it (plain data)."""

    name: str
    base_url: str
    api_key: str | None = None
    models: frozenset[str] = frozenset()
    prefix: str = ""
    forward_client_key: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    context_window: int = 0
    max_connections: int = 100
    slots: int = 1

    def url(self, path: str) -> str:
        """The upstream URL for a path relative to its base (`chat/completions`)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def root_url(self) -> str:
        """The server's root, without a trailing `/v1` (for `/props`, `/api/show`)."""
        base = self.base_url
        return base[: -len("/v1")] if base.endswith("/v1") else base


@dataclass(frozen=True)
class Route:
    """Where one request goes, and the model name the upstream should see."""

    upstream: Upstream
    model: str | None


class Router:
    """Picks the upstream for a model name.

    Order: `routes` (exact names or globs such as `gpt-4*`), an upstream's `models`
    list, a model that exactly one upstream listed when asked (`learn`), a
    `prefix/model` name (prefix stripped before forwarding), then the default upstream.
    With no default, an unknown model is a 404.
    """

    def __init__(
        self,
        upstreams: Iterable[Upstream],
        routes: Mapping[str, str] | None = None,
        default: str | None = None,
    ):
        self.upstreams: dict[str, Upstream] = {u.name: u for u in upstreams}
        self._routes = dict(routes or {})
        self.default: Upstream | None = self.upstreams.get(default) if default else None
        if default and self.default is None:
            raise ValueError(f"default upstream {default!r} is not configured")
        self._by_prefix = {u.prefix: u for u in self.upstreams.values() if u.prefix}
        self._listed: dict[str, Upstream] = {}
        self._lists: dict[str, frozenset[str]] = {}  # what each upstream listed last
        self._asked_at: float | None = None  # when a name no rule knew last made us ask

    def learn(self, listed: Mapping[str, Iterable[str]]) -> None:
        """Remember the models each upstream lists (upstream name -> model ids): a model
        that only one of them lists goes there by its bare name (apps pick a name from
        /v1/models; with several upstreams it would otherwise need a prefix). An upstream
        missing from `listed` (it did not answer) keeps the list it gave last."""
        self._lists.update((name, frozenset(models)) for name, models in listed.items())
        owners: dict[str, set[str]] = {}
        for name, models in self._lists.items():
            for model in models:
                owners.setdefault(model, set()).add(name)
        self._listed = {
            model: self.upstreams[next(iter(names))]
            for model, names in owners.items()
            if len(names) == 1 and next(iter(names)) in self.upstreams
        }

    def match(self, model: str) -> Route | None:
        """The route a rule gives `model`, without the default; None if none does."""
        for pattern, name in self._routes.items():
            if pattern == model or fnmatch.fnmatchcase(model, pattern):
                return Route(self.upstreams[name], model)
        for upstream in self.upstreams.values():
            if model in upstream.models:
                return Route(upstream, model)
        if model in self._listed:
            return Route(self._listed[model], model)
        prefix, sep, rest = model.partition("/")
        if sep and rest and prefix in self._by_prefix:
            return Route(self._by_prefix[prefix], rest)
        return None

    def pick(self, model: str | None) -> Route:
        """The route for `model`; raises ModelNotFound when nothing serves it."""
        route = self.match(model) if model else None
        if route is not None:
            return route
        if self.default is not None:
            return Route(self.default, model)
        if not model:
            raise ModelNotFound(
                "no model given and no default upstream is configured", param="model"
            )
        several = sorted(
            f"{self.upstreams[name].prefix}/{model}"
            for name, models in self._lists.items()
            if model in models and self.upstreams[name].prefix
        )
        if len(several) > 1:
            raise ModelNotFound(
                f"model {model!r} is served by several upstreams; name one: " + ", ".join(several),
                param="model",
            )
        known = ", ".join(sorted(self._by_prefix)) or "none"
        raise ModelNotFound(
            f"model {model!r} is not served by any upstream and no default upstream is "
            f"configured (prefix a model with an upstream name: {known})",
            param="model",
        )

    def may_ask(self, now: float, every: float) -> bool:
        """Whether to ask the upstreams for their models now (at most once per `every`
        seconds): a name no rule knows may be one that a single upstream serves."""
        if self._asked_at is not None and now - self._asked_at < every:
            return False
        self._asked_at = now
        return True

    def public_model_id(self, upstream: Upstream, model_id: str) -> str:
        """The id under which a model is listed, so that it routes back to `upstream`."""
        if self.pick_quietly(model_id) is upstream:
            return model_id
        return f"{upstream.prefix}/{model_id}" if upstream.prefix else model_id

    def pick_quietly(self, model: str) -> Upstream | None:
        """Like pick(), but None instead of an error."""
        try:
            return self.pick(model).upstream
        except ModelNotFound:
            return None
