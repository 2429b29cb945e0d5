"""Everything a route needs, built once by the app's lifespan and passed down."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy.metrics import Metrics
from proxy.routes.auth import Auth
from proxy.routes.plan import Memory
from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.gate import UpstreamGate
from proxy.upstreams.registry import Router


@dataclass
class AppState:
    """The long-lived objects of a running proxy."""

    router: Router
    pool: UpstreamPool
    auth: Auth
    memory: Memory
    metrics: Metrics
    max_body_bytes: int
    gate: UpstreamGate
    # Held while the upstreams are asked for their models on behalf of a request.
    asking_models: asyncio.Lock = field(default_factory=asyncio.Lock)
