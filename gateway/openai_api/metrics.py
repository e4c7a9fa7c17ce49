"""Prometheus metrics of the REST shim, on its own /metrics (the engine's are on the gRPC
server's metrics port). Requests are counted by a plain ASGI middleware, so streamed responses are
timed to their last byte and no per-request task or copy is added."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

KNOWN_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/docs",
    }
)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip


class ShimMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gptqgw_http_requests_total", "HTTP requests by path and status", ["path", "status"],
            registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "gptqgw_http_request_duration_seconds",
            "Request arrival to last byte (streams included)",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "gptqgw_http_time_to_first_token_seconds",
            "Streamed requests: arrival to the first event with tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.streams_open = Gauge("gptqgw_http_streams_open", "SSE streams being sent", registry=r)
        self.client_disconnects = Counter(
            "gptqgw_http_client_disconnects_total",
            "Requests whose client went away before the end (upstream calls cancelled)",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gptqgw_http_prompt_tokens_total", "Prompt tokens of finished requests", registry=r
        )
        self.completion_tokens = Counter(
            "gptqgw_http_completion_tokens_total",
            "Generated tokens of finished requests",
            registry=r,
        )


class MetricsMiddleware:
    """Counts every HTTP request by path (unknown paths as "other") and status."""

    def __init__(self, app: ASGIApp, metrics: ShimMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path not in KNOWN_PATHS:
            path = "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        started = time.perf_counter()
        status = 500  # what the server sends if the app fails before starting a response

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
