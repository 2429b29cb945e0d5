"""Process metrics, rendered as Prometheus text at /metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.errors import ProxyError

# Upper bounds (seconds) of the upstream time-to-first-byte histogram.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    """Counters and one histogram; cheap enough to update on every request."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    upstream_seconds: dict[str, list[float]] = field(default_factory=dict)
    upstream_count: Counter[str] = field(default_factory=Counter)
    upstream_sum: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)

    def count_request(self, route: str, status: int) -> None:
        """One finished request on `route` with `status`."""
        self.requests[(route, status)] += 1

    def count_error(self, error: ProxyError) -> None:
        """One error answered to a client."""
        self.errors[error.code or error.type] += 1

    def upstream_started(self, upstream: str, seconds: float) -> None:
        """Time from request arrival until the upstream's response headers."""
        buckets = self.upstream_seconds.setdefault(upstream, [0] * len(_BUCKETS))
        for i, bound in enumerate(_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        self.upstream_count[upstream] += 1
        self.upstream_sum[upstream] += seconds

    def add(self, name: str, value: float = 1) -> None:
        """Add to a named counter (tokens_in, tokens_saved, memories_injected, ...)."""
        self.counters[name] += value

    def render(self) -> str:
        """Prometheus text exposition format."""
        lines = [
            "# HELP mnemoproxy_requests_total Requests answered, by route and status.",
            "# TYPE mnemoproxy_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'mnemoproxy_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP mnemoproxy_errors_total Errors answered to clients, by code.",
            "# TYPE mnemoproxy_errors_total counter",
        ]
        for code, n in sorted(self.errors.items()):
            lines.append(f'mnemoproxy_errors_total{{code="{code}"}} {n}')
        lines += [
            "# HELP mnemoproxy_upstream_seconds Time until the upstream's response headers.",
            "# TYPE mnemoproxy_upstream_seconds histogram",
        ]
        for name, buckets in sorted(self.upstream_seconds.items()):
            for bound, n in zip(_BUCKETS, buckets, strict=True):
                lines.append(
                    f'mnemoproxy_upstream_seconds_bucket{{upstream="{name}",le="{bound}"}} {n}'
                )
            total = self.upstream_count[name]
            lines.append(
                f'mnemoproxy_upstream_seconds_bucket{{upstream="{name}",le="+Inf"}} {total}'
            )
            seconds = self.upstream_sum[name]
            lines.append(f'mnemoproxy_upstream_seconds_sum{{upstream="{name}"}} {seconds:.6f}')
            lines.append(f'mnemoproxy_upstream_seconds_count{{upstream="{name}"}} {total}')
        for name, value in sorted(self.counters.items()):
            lines += [
                f"# TYPE mnemoproxy_{name}_total counter",
                f"mnemoproxy_{name}_total {value:g}",
            ]
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE mnemoproxy_{name} gauge", f"mnemoproxy_{name} {read():g}"]
        return "\n".join(lines) + "\n"
