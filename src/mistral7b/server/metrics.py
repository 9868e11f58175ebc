"""Prometheus metrics through `prometheus_client`, named as vLLM names them where the meaning is the
same (`..._num_requests_running`, `..._time_to_first_token_seconds`, ...), so existing dashboards work.

Each app has its own registry (tests build several apps in one process). Counts kept by the engine
thread (steps, aborts) and the queue gauges are read at scrape time by `EngineCollector`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "mistral7b"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineCollector:
    """Gauges and counters read from the engine client's `stats()` when scraped."""

    def __init__(self, client, pending):
        self.client, self.pending = client, pending

    def collect(self):
        stats = self.client.stats()
        running = GaugeMetricFamily(f"{PREFIX}_num_requests_running", "Sequences holding a cache row.")
        running.add_metric([], stats.running)
        waiting = GaugeMetricFamily(f"{PREFIX}_num_requests_waiting", "Sequences waiting for a cache row.")
        waiting.add_metric([], stats.waiting + self.pending())
        aborted = CounterMetricFamily(f"{PREFIX}_sequences_aborted", "Sequences aborted (client gone).")
        aborted.add_metric([], stats.aborted)
        steps = CounterMetricFamily(f"{PREFIX}_engine_steps", "Engine steps run.")
        steps.add_metric([], stats.steps)
        return [running, waiting, aborted, steps, *prefix_cache_metrics(stats.prefix), *spec_decode_metrics(stats.spec)]


PREFIX_CACHE_HELP = {  # vLLM's names (vllm:prefix_cache_queries_total, ...) with our prefix
    "mistral7b:prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "mistral7b:prefix_cache_hits": "Prompt tokens restored from the prefix cache (of those looked up).",
    "mistral7b:prefix_cache_stored_tokens": "Prompt tokens stored in the prefix cache.",
    "mistral7b:prefix_cache_evictions": "Prefix cache blocks evicted (least recently used).",
    "mistral7b:prefix_cache_usage_bytes": "Bytes of the prefix cache holding blocks.",
    "mistral7b:prefix_cache_capacity_bytes": "Bytes of the prefix cache pool (its budget, in whole blocks).",
}


def prefix_cache_metrics(counters: dict | None) -> list:
    """The prefix cache's counters (`..._total`) and gauges (`..._bytes`); none when it is off."""
    if counters is None:
        return []
    families = []
    for name, value in counters.items():
        family = GaugeMetricFamily if name.endswith("_bytes") else CounterMetricFamily
        metric = family(name, PREFIX_CACHE_HELP[name])
        metric.add_metric([], value)
        families.append(metric)
    return families


def spec_decode_metrics(stats) -> list:
    """Speculative decoding's counters under vLLM's names (vllm:spec_decode_num_draft_tokens_total, ...)
    with our prefix; none when speculation is off."""
    if stats is None:
        return []
    counts = {
        "mistral7b:spec_decode_num_drafts": ("Row-steps that verified draft tokens.", stats.verify_rows),
        "mistral7b:spec_decode_num_draft_tokens": ("Draft tokens proposed.", stats.draft_tokens),
        "mistral7b:spec_decode_num_accepted_tokens": ("Draft tokens accepted.", stats.accepted_tokens),
    }
    families = []
    for name, (help_text, value) in counts.items():
        family = CounterMetricFamily(name, help_text)
        family.add_metric([], value)
        families.append(family)
    per_position = CounterMetricFamily("mistral7b:spec_decode_num_accepted_tokens_per_pos",
                                       "Draft tokens accepted, by position in the draft.", labels=["position"])
    for position, value in enumerate(stats.accepted_per_position):
        per_position.add_metric([str(position)], value)
    return [*families, per_position]


class Metrics:
    """The app's metrics; `prometheus_client`'s metrics are thread-safe, so the engine thread and the
    event loop both record into them."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status code.",
                                ("path", "code"), registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted sequences.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens.", registry=r)
        self.finished = Counter(f"{PREFIX}_sequences_finished", "Finished sequences by finish reason.",
                                ("finish_reason",), registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between tokens of a sequence.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from arrival to last token.",
                             buckets=E2E_BUCKETS, registry=r)

    def watch(self, client, pending) -> None:
        """Report the engine client's queue and counts; `pending()` counts requests not yet queued."""
        self.registry.register(EngineCollector(client, pending))

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def record_tokens(self, request, n: int, now: float, last_time: float | None, finish_reason: str | None) -> None:
        """`n` tokens of `request` reached its client at `now`; the previous ones at `last_time`."""
        self.generation_tokens.inc(n)
        if last_time is None:
            if request.first_token_time is not None:
                self.ttft.observe(request.first_token_time - request.arrival_time)
        else:
            for _ in range(n):  # a multi-step decode delivers n tokens at once: spread the gap over them
                self.itl.observe((now - last_time) / n)
        if finish_reason is not None:
            self.finished.labels(finish_reason).inc()
            self.e2e.observe(now - request.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
