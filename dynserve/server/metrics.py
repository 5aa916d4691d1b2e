"""Prometheus metrics of one server app.

Two sources:
  - engine state (gauges and cumulative counters, expert-count histograms) is read from the
    latest EngineStats snapshot at scrape time by a custom Collector: nothing is observed per
    token in Python;
  - request latencies (TTFT, inter-token, end-to-end, queue time) and finished-request counts are
    observed as outputs arrive (ServerMetrics implements AsyncEngine's RequestMetricsSink).

Every app owns its own CollectorRegistry, so several apps can live in one process (tests).
Names use the `dynserve_` prefix and base units; the `vllm:` gauges that multi-replica routers
scrape are exported as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from dynserve.engine import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0, 180.0, 600.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.4, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

FINISHED_REASONS = ("stop", "length", "abort")


class EngineStatsCollector(Collector):
    """Turns the current EngineStats snapshot into metric families at scrape time."""

    def __init__(
        self, stats_fn: Callable[[], EngineStats], model_name: str, enable_expert_token_metrics: bool = False
    ) -> None:
        self._stats_fn = stats_fn
        self._model_name = model_name
        self._expert_tokens = enable_expert_token_metrics

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on the engine (MoE or dense)

    def collect(self) -> Iterator[Metric]:
        s = self._stats_fn()
        yield _gauge("dynserve_num_requests_running", "Requests currently being computed.", s.num_running_requests)
        yield _gauge("dynserve_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting_requests)
        yield _gauge(
            "dynserve_kv_cache_usage_ratio",
            "Fraction of KV cache blocks held by live sequences (0..1).",
            s.kv_cache_usage,
        )
        yield _gauge("dynserve_kv_cache_blocks", "Blocks in the KV cache pool.", s.num_kv_blocks_total)
        yield _gauge(
            "dynserve_expert_budget",
            "Load-adaptive expert budget factor b applied to new requests (1 = unreduced; --expert-budget auto).",
            s.expert_budget,
        )
        yield _gauge(
            "dynserve_kv_cache_free_blocks",
            "KV blocks free for allocation (incl. evictable cached).",
            s.num_kv_blocks_free,
        )
        yield _counter(
            "dynserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield _counter("dynserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield _counter("dynserve_num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions)
        yield _counter("dynserve_prompt_tokens", "Prompt tokens of accepted requests.", s.prompt_tokens)
        yield _counter("dynserve_generation_tokens", "Tokens generated.", s.generation_tokens)
        yield _counter(
            "dynserve_expert_activations",
            "FFN expert activations: sum over routed token positions and MoE layers of experts used.",
            s.expert_activations,
        )
        if s.expert_k_histogram:
            yield self._experts_per_token(s)
        if s.expert_load_balance:
            fam = GaugeMetricFamily(
                "dynserve_expert_load_balance",
                "Mean / max tokens per expert over the last engine steps, per MoE layer (1.0 = perfectly even).",
                labels=["layer"],
            )
            for layer, v in enumerate(s.expert_load_balance):
                if v is not None:
                    fam.add_metric([str(layer)], v)
            yield fam
        if s.experts_touched_histogram:
            yield _experts_touched(s.experts_touched_histogram)
        if self._expert_tokens and s.expert_token_counts is not None:
            fam = CounterMetricFamily(
                "dynserve_expert_tokens", "Token positions routed to each expert.", labels=["layer", "expert"]
            )
            for layer, row in enumerate(s.expert_token_counts):
                for expert, count in enumerate(row):
                    fam.add_metric([str(layer), str(expert)], count)
            yield fam
        # names scraped by multi-replica routers (vLLM production-stack, llm-d, AIBrix)
        labels = ["model_name"]
        value = [self._model_name]
        for name, doc, v in (
            ("vllm:num_requests_running", "Requests currently being computed.", s.num_running_requests),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting_requests),
            ("vllm:kv_cache_usage_perc", "KV cache usage (0..1).", s.kv_cache_usage),
            ("vllm:gpu_cache_usage_perc", "KV cache usage (0..1), older name.", s.kv_cache_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            yield g
        for name, doc, v in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            yield c

    @staticmethod
    def _experts_per_token(s: EngineStats) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(
            "dynserve_experts_per_token",
            "FFN experts used per token position, per MoE layer (bucket le=k: tokens that used <= k).",
            labels=["layer"],
        )
        for layer, row in enumerate(s.expert_k_histogram):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for k, count in enumerate(row):
                cumulative += count
                buckets.append((f"{float(k)}", cumulative))
            buckets.append(("+Inf", cumulative))
            total = sum(k * c for k, c in enumerate(row))
            fam.add_metric([str(layer)], buckets, sum_value=total)
        return fam


def touched_buckets(num_experts: int) -> list[int]:
    """Bucket bounds of the distinct-experts histogram: 0, powers of two below E, and E (bounded
    cardinality: about log2(E) + 2 buckets per layer whatever E)."""
    bounds = [0]
    b = 1
    while b < num_experts:
        bounds.append(b)
        b *= 2
    return [*bounds, num_experts]


def _experts_touched(hist: list[list[int]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(
        "dynserve_experts_touched_per_step",
        "Distinct experts an engine step's tokens used, per MoE layer (how many expert weights it read).",
        labels=["layer"],
    )
    for layer, row in enumerate(hist):
        bounds = touched_buckets(len(row) - 1)
        cumulative = [sum(row[: b + 1]) for b in bounds]
        buckets = [(f"{float(b)}", c) for b, c in zip(bounds, cumulative, strict=True)]
        buckets.append(("+Inf", sum(row)))
        fam.add_metric([str(layer)], buckets, sum_value=sum(j * c for j, c in enumerate(row)))
    return fam


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """Owns one app's CollectorRegistry: the engine-state collector, latency histograms and the
    finished-request counter. Implements AsyncEngine's RequestMetricsSink."""

    def __init__(
        self,
        stats_fn: Callable[[], EngineStats],
        model_name: str,
        enable_expert_token_metrics: bool = False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineStatsCollector(stats_fn, model_name, enable_expert_token_metrics))
        r = self.registry
        self.request_success = Counter(
            "dynserve_request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        for reason in FINISHED_REASONS:
            self.request_success.labels(reason)
        self.ttft = Histogram(
            "dynserve_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dynserve_inter_token_latency_seconds",
            "Time between consecutive outputs of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "dynserve_e2e_request_latency_seconds",
            "Time from arrival to the finished output.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "dynserve_request_queue_time_seconds",
            "Time from arrival to the first scheduled step.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )

    # RequestMetricsSink
    def observe_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def observe_inter_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def observe_finished(self, finish_reason: str, e2e_s: float, queue_s: float | None) -> None:
        self.request_success.labels(finish_reason).inc()
        self.e2e.observe(e2e_s)
        if queue_s is not None:
            self.queue_time.observe(queue_s)

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
