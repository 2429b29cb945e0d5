"""Background LLM work, wired from settings: its knobs and the memory model.

`proxy.memory` takes plain arguments; this is where `[background]` and `[prompts]`
become them (as `app.py` does for everything else).
"""

from __future__ import annotations

from proxy.memory.llm import MemoryModel
from proxy.memory.schedule import BackgroundConfig
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.upstreams.client import UpstreamPool
from proxy.upstreams.gate import UpstreamGate
from proxy.upstreams.registry import Router
from proxy.upstreams.windows import ContextWindows


def background_config(settings: Settings) -> BackgroundConfig:
    """The knobs of background work from `[background]`."""
    bg = settings.background
    return BackgroundConfig(
        enabled=bg.llm,
        upstream=bg.upstream,
        model=bg.model,
        summary=bg.summary,
        summary_every=bg.summary_every,
        summary_words=bg.summary_words,
        summary_batch_tokens=bg.summary_batch_tokens,
        facts=bg.facts,
        known_facts=bg.known_facts,
        reflection=bg.reflection,
        reflect_threshold=bg.reflect_threshold,
        reflect_insights=bg.reflect_insights,
        max_attempts=bg.max_attempts,
        backoff_seconds=bg.backoff_seconds,
        max_tokens=bg.max_tokens,
    )


def memory_model(
    settings: Settings,
    router: Router,
    pool: UpstreamPool,
    gate: UpstreamGate,
    metrics: Metrics,
    windows: ContextWindows | None = None,
) -> MemoryModel:
    """The client background jobs ask the model through (gated, counted in /metrics)."""
    bg = settings.background
    return MemoryModel(
        pool,
        gate,
        router.upstreams,
        timeout=bg.timeout,
        temperature=bg.temperature,
        structured=bg.structured_output,
        retry_prompt=settings.prompt_texts().retry,
        count=metrics.add,
        windows=windows,
    )
