"""Prometheus metrics of the gRPC server, served on their own HTTP port.

Latency histograms are observed by the servicer, as the client sees them (tokenization and
queueing included). Engine state (running and waiting sequences, KV-cache use, token counters)
is read from `engine.stats()` when Prometheus scrapes, so it is exact and costs nothing per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.proto import SERVICE_NAME, pb2

# Wide enough for a CPU engine (seconds) and a GPU one (milliseconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
# The `method` label's values: the service's own methods, and "other" for any other name a
# client sends (one series per made-up name would let anyone grow /metrics without bound).
KNOWN_METHODS = frozenset(pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name)
OTHER_METHOD = "other"


def method_label(full_method: str) -> str:
    """`/gptqgw.v1.Gateway/Generate` -> `Generate`; anything else -> "other"."""
    service, _, name = full_method.lstrip("/").rpartition("/")
    return name if service == SERVICE_NAME and name in KNOWN_METHODS else OTHER_METHOD


class GatewayMetrics:
    """The server's metrics, in a registry of their own (several servers may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "gptqgw_time_to_first_token_seconds",
            "Generate: from the request's arrival to its first token leaving the server.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "gptqgw_inter_token_latency_seconds",
            "Generate: time between consecutive chunks of one stream, per token.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "gptqgw_e2e_request_latency_seconds",
            "Generate: from the request's arrival to the end of its stream, whatever the outcome.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "gptqgw_requests",
            "Finished RPCs by method and gRPC status (ok, cancelled, invalid_argument, ...).",
            ["method", "status"],
            registry=self.registry,
        )
        self.finish_reasons = Counter(
            "gptqgw_generate_finish_reasons",
            "Generate streams that ended, by finish reason (stop, length, cancelled, error).",
            ["reason"],
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "gptqgw_streams_open",
            "Generate calls open on this server (what a drain waits for).",
            registry=self.registry,
        )

    def watch_engine(self, stats: Callable[[], Any | None]) -> None:
        """Expose the engine's own gauges and counters; `stats` returns None until it is loaded."""
        self.registry.register(_EngineStatsCollector(stats))

    def serve_http(self, host: str, port: int) -> Callable[[], None]:
        """Start the /metrics endpoint in a daemon thread; returns the function that stops it."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)

        return stop


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], Any | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        yield _gauge(
            "gptqgw_requests_running", "Sequences in the engine's running batch.", stats.running
        )
        yield _gauge(
            "gptqgw_requests_waiting", "Requests waiting for a place in the batch.", stats.waiting
        )
        yield _gauge("gptqgw_max_num_seqs", "Most sequences in the batch.", stats.max_num_seqs)
        yield _gauge("gptqgw_kv_cache_blocks_used", "KV blocks in use.", stats.kv_blocks_used)
        yield _gauge(
            "gptqgw_kv_cache_blocks_total", "KV blocks in the pool.", stats.kv_blocks_total
        )
        yield _gauge("gptqgw_kv_cache_tokens_used", "KV-cache tokens held.", stats.kv_tokens_used)
        yield _gauge(
            "gptqgw_kv_cache_tokens_total", "KV-cache capacity in tokens.", stats.kv_tokens_total
        )
        total = stats.kv_blocks_total or 0
        usage = stats.kv_blocks_used / total if total else 0.0
        yield _gauge("gptqgw_kv_cache_usage_ratio", "KV-cache use, 0 to 1.", usage)
        counters = (
            ("gptqgw_prompt_tokens", "Prompt tokens prefilled.", stats.prompt_tokens_total),
            ("gptqgw_generation_tokens", "Tokens generated.", stats.generated_tokens_total),
            (
                "gptqgw_prefix_cache_query_tokens",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_query_tokens_total,
            ),
            (
                "gptqgw_prefix_cache_hit_tokens",
                "Prompt tokens whose KV came from the prefix cache.",
                stats.prefix_hit_tokens_total,
            ),
            (
                "gptqgw_preemptions",
                "Sequences preempted for lack of KV blocks.",
                stats.preemptions_total,
            ),
            ("gptqgw_engine_steps", "Engine forward steps.", stats.steps_total),
            (
                "gptqgw_engine_step_tokens",
                "Tokens computed over all steps (divide by steps for the mean batch).",
                stats.step_tokens_total,
            ),
        )
        for name, documentation, value in counters:
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter
        steps = CounterMetricFamily(
            "gptqgw_engine_kind_steps",
            "Engine steps by kind: decode (one token per sequence) or mixed (prompt chunks too).",
            labels=["kind"],
        )
        for kind, count in stats.steps_by_kind.items():
            steps.add_metric([kind], count)
        yield steps
        phases = CounterMetricFamily(
            "gptqgw_engine_step_phase_seconds",
            "Engine step time by kind and phase (gateway/engine/step_timing.py).",
            labels=["kind", "phase"],
        )
        for (kind, phase), seconds in stats.step_phase_seconds.items():
            phases.add_metric([kind, phase], seconds)
        yield phases


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
