"""Prometheus metrics (L6), named as vLLM names them with a `tokenloom:` prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.serving.context import Admission, Trace

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Counts since start, read from the engine loop's EngineStats snapshot: (metric name, field, description)
_SNAPSHOT_GAUGES = (
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache (since start)"),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache (since start)"),
    ("prefix_cache_hit_rate", "prefix_cache_hit_rate",
     "prefix_cache_hits / prefix_cache_queries (0 before any lookup)"),
    ("spec_decode_num_drafts", "spec_decode_num_drafts",
     "Speculating rows verified, one row in one step (since start)"),
    ("spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens",
     "Tokens proposed by speculative decoding (since start)"),
    ("spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens",
     "Proposed tokens the model accepted (since start)"),
    ("spec_decode_draft_acceptance_rate", "spec_decode_acceptance_rate",
     "spec_decode_num_accepted_tokens / spec_decode_num_draft_tokens (0 before any proposal)"),
)


class Metrics:
    """One registry per app (several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("tokenloom:num_requests_running", "Requests the engine is computing", registry=r)
        self.waiting = Gauge("tokenloom:num_requests_waiting",
                             "Requests waiting: in the engine's queue or for a concurrency slot", registry=r)
        self.kv_usage = Gauge("tokenloom:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)", registry=r)
        self.kv_free = Gauge("tokenloom:kv_cache_free_blocks", "KV-cache blocks in the free pool", registry=r)
        # (gauge, the EngineStats field it reads at scrape time)
        self.snapshot_gauges = [
            (Gauge(f"tokenloom:{name}", description, registry=r), field) for name, field, description in _SNAPSHOT_GAUGES
        ]
        self.healthy = Gauge("tokenloom:engine_healthy", "1 while the engine loop runs and steps succeed", registry=r)
        self.weights_bytes = Gauge("tokenloom:weights_bytes", "Bytes held by the model's weights (with the dense copies built so far)", registry=r)
        self.kv_cache_bytes = Gauge("tokenloom:kv_cache_bytes", "Bytes held by the KV-cache pool", registry=r)
        self.peak_memory = Gauge("tokenloom:peak_memory_bytes",
                                 "Peak memory so far: the process's peak RSS on the CPU, peak allocated on a GPU",
                                 registry=r)
        self.prompt_tokens = Counter("tokenloom:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tokenloom:generation_tokens", "Generated tokens", registry=r)
        self.success = Counter("tokenloom:request_success", "Finished requests by finish reason",
                               ["finished_reason"], registry=r)
        self.rejected = Counter("tokenloom:request_rejected", "Requests refused before generation, by status",
                                ["status"], registry=r)
        self.ttft = Histogram("tokenloom:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tokenloom:inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tokenloom:e2e_request_latency_seconds", "Request latency, end to end",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("tokenloom:request_queue_time_seconds", "Time a request waited for the engine",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_hist = Histogram("tokenloom:request_prompt_tokens", "Prompt tokens per request",
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self.generation_hist = Histogram("tokenloom:request_generation_tokens", "Generated tokens per request",
                                         buckets=_TOKEN_BUCKETS, registry=r)

    def bind(self, engine: AsyncEngine, admission: Admission) -> None:
        """Gauges read the engine loop's last published snapshot at scrape time."""
        self.running.set_function(lambda: engine.stats.num_running)
        self.waiting.set_function(lambda: engine.stats.num_waiting + admission.queued)
        self.kv_usage.set_function(lambda: engine.stats.kv_cache_usage)
        self.kv_free.set_function(lambda: engine.stats.num_free_kv_blocks)
        self.healthy.set_function(lambda: 1.0 if engine.is_healthy else 0.0)
        for gauge, field in self.snapshot_gauges:
            gauge.set_function(lambda field=field: getattr(engine.stats, field))
        from tokenloom.engine.memory import module_bytes, peak_bytes

        model, device = engine.engine.model, engine.engine.device
        self.kv_cache_bytes.set(engine.engine.kv_cache.nbytes)  # fixed once the engine exists
        # read at scrape time: the default mode builds its dense copies for wide calls on first use
        self.weights_bytes.set_function(lambda: module_bytes(model))
        self.peak_memory.set_function(lambda: peak_bytes(device))

    def observe(self, trace: Trace, now: float, status: int) -> None:
        if status >= 400 and status != 499 and not trace.finish_reasons:
            self.rejected.labels(status=str(status)).inc()
            return
        for reason in trace.finish_reasons or ["abort"]:
            self.success.labels(finished_reason=reason).inc()
        self.prompt_tokens.inc(trace.num_prompt_tokens)
        self.generation_tokens.inc(trace.num_output_tokens)
        self.prompt_hist.observe(trace.num_prompt_tokens)
        self.generation_hist.observe(trace.num_output_tokens)
        if trace.first_token is not None:
            self.ttft.observe(trace.first_token - trace.received)
        for gap in trace.inter_token:
            self.itl.observe(gap)
        if trace.queue_time is not None:
            self.queue.observe(trace.queue_time)
        self.e2e.observe(now - trace.received)

    def render(self) -> bytes:
        return generate_latest(self.registry)
