"""Prometheus metrics of one server app (its own CollectorRegistry, so tests can run several).

Request-level series are recorded by the front end when a RequestStream ends; engine-level
series (queue, pages, hit rate, PCIe bytes) are read at scrape time from the latest
`engine.stats()` snapshot that AsyncEngine keeps. A stats key the engine does not report yet is
simply not exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .async_engine import RequestStream

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "spinserve"

# seconds; TTFT spans CPU prefill of long prompts, TPOT spans fast GPU decode to CPU decode
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# engine.stats() key -> (metric name, help, kind); kind "gauge" or "counter" (monotonic total)
ENGINE_STATS: dict[str, tuple[str, str, str]] = {
    "running": ("requests_running", "Requests scheduled in the running batch", "gauge"),
    "waiting": ("requests_waiting", "Requests queued, not yet admitted", "gauge"),
    "kv_pages_used": ("kv_pages_used", "KV pages allocated (single-tier pool)", "gauge"),
    "kv_pages_total": ("kv_pages_total", "KV page capacity (single-tier pool)", "gauge"),
    "hbm_pages_used": ("hbm_pages_used", "KV pages resident in HBM", "gauge"),
    "hbm_pages_total": ("hbm_pages_total", "KV page slots in the HBM pool", "gauge"),
    "host_pages_used": ("host_pages_used", "KV pages in the host (pinned) pool", "gauge"),
    "host_pages_total": ("host_pages_total", "KV page slots in the host pool", "gauge"),
    "hit_rate": ("cache_hit_rate", "HBM hit rate of selected pages (recent window)", "gauge"),
    "page_hits": ("page_hits", "Selected pages found resident in HBM", "counter"),
    "page_lookups": ("page_lookups", "Selected pages looked up", "counter"),
    "pcie_bytes_fetched": ("pcie_fetched_bytes", "Bytes gathered host -> HBM", "counter"),
    "pcie_bytes_offloaded": ("pcie_offloaded_bytes", "Bytes written HBM -> host", "counter"),
    "num_preemptions": ("preemptions", "Requests preempted for lack of HBM", "counter"),
    "inflight_requests": ("requests_inflight", "Requests with an open client stream", "gauge"),
    "engine_steps": ("engine_steps", "Scheduler steps run", "counter"),
    "engine_idle_checks": ("engine_idle", "Times the engine ran out of work", "counter"),
    "integrity_ok": ("engine_integrity_ok", "1 if the latest idle check_integrity passed", "gauge"),
}


class _EngineCollector(Collector):
    def __init__(self, read_stats: Callable[[], dict[str, float]]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._read_stats()
        for key, (name, doc, kind) in ENGINE_STATS.items():
            if key not in stats:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"{PREFIX}_{name}", doc, value=stats[key])


class ServerMetrics:
    """All series of one app; `observe(stream)` is AsyncEngine's on_request_done hook."""

    def __init__(self, read_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Generation requests by outcome (stop, length, abort, cancelled, error, rejected)",
            ["outcome"],
            registry=reg,
        )
        self.http_errors = Counter(
            f"{PREFIX}_http_errors", "Error responses by status code", ["code"], registry=reg
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", registry=reg
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Generated tokens", registry=reg
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=TPOT_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        reg.register(_EngineCollector(read_stats))

    def observe(self, stream: RequestStream) -> None:
        t = stream.times
        self.requests.labels(stream.outcome or "error").inc()
        self.prompt_tokens.inc(stream.num_prompt_tokens)
        self.generation_tokens.inc(stream.num_output_tokens)
        if t.first_token is not None:
            self.ttft.observe(t.first_token - t.arrival)
        if t.finished is not None:
            self.e2e.observe(t.finished - t.arrival)
            if t.first_token is not None and stream.num_output_tokens > 1:
                self.tpot.observe((t.finished - t.first_token) / (stream.num_output_tokens - 1))

    def rejected(self, status: int) -> None:
        """A request answered with an error before (or instead of) reaching the engine."""
        self.http_errors.labels(str(status)).inc()
        if 400 <= status < 500:
            self.requests.labels("rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
