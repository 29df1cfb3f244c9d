"""Prometheus metrics: what the HTTP layer counts, and the engine's state read at scrape time.

One `ServerMetrics` per app (its own `CollectorRegistry`, so several apps can live in one process,
as the tests start them). Routes find it with `metrics_of(request.app)`; they record token counts
and latencies as requests run. Requests by endpoint and status are counted by the ASGI middleware
`RequestMetrics`, which sees every answer (validation errors, 401s and 404s included). The engine's
gauges (running, waiting, KV cache usage, prefix-cache hit rate, ...) are not pushed: `render(stats)`
reads the snapshot it is given, so a scrape always shows the engine as it is now.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.engine import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "gptoss"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

# No `*_created` series beside every counter and histogram (process-wide; vLLM does the same).
disable_created_metrics()


class _EngineCollector(Collector):
    """Yields the engine's gauges from the snapshot `render` was given (none before the model)."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        gauges = (
            ("requests_running", "Requests the engine is running now.", stats.running),
            ("requests_waiting", "Requests queued for the engine.", stats.waiting),
            ("kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", stats.kv_cache_usage),
            (
                "prefix_cache_hit_ratio",
                "Fraction of prompt tokens served from the prefix cache.",
                stats.prefix_cache_hit_rate,
            ),
            (
                "engine_generation_tokens_per_second",
                "Tokens the engine generated per second over the last seconds.",
                stats.generation_tokens_per_s,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        yield CounterMetricFamily(
            f"{PREFIX}_preemptions", "Requests preempted by the scheduler.", stats.num_preemptions
        )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by endpoint (route path) and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of served requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated for clients.", registry=self.registry
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the request's arrival at the route to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Gaps between successive generated tokens of one request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def observe_generated_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self, stats: EngineStats | None) -> bytes:
        """The exposition text; `stats` is the engine's snapshot, None while the model loads."""
        self._engine.stats = stats
        return generate_latest(self.registry)


def metrics_of(app: FastAPI) -> ServerMetrics:
    """The app's metrics, made on first use (the app factory may attach one itself)."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = app.state.metrics = ServerMetrics()
    return metrics


class RequestMetrics:
    """ASGI middleware: counts every HTTP answer by route template (not raw path) and status.

    Paths that match no route are counted as `other`, so scanners cannot grow the label set.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees when the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            metrics_of(scope["app"]).observe_request(endpoint, status)
