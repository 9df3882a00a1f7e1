"""Prometheus metrics of `qst-serve` (`GET /metrics`): requests, tokens, queue, slots, TTFT and TPOT."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """One registry per server, so two servers in one process (tests) never share counts."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qst_requests", "requests admitted, per model (a side network or the base)",
                                ["model"], registry=r)
        self.finished_requests = Counter("qst_requests_finished", "finished requests per finish reason",
                                         ["reason"], registry=r)
        self.prompt_tokens = Counter("qst_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("qst_generation_tokens", "generated tokens of finished requests", registry=r)
        self.queue_depth = Gauge("qst_queue_depth", "requests waiting for a decode slot", registry=r)
        self.slots_busy = Gauge("qst_slots_busy", "decode slots holding a request", registry=r)
        self.slots = Gauge("qst_slots", "decode slots", registry=r)
        self.sides_loaded = Gauge("qst_side_networks_loaded", "side networks loaded (host)", registry=r)
        self.sides_host_bytes = Gauge("qst_side_networks_host_bytes", "bytes of the side networks' host copies",
                                      registry=r)
        self.side_device_loads = Gauge("qst_side_device_loads", "side networks copied from the host into a device "
                                       "stack so far (an LRU miss each)", registry=r)
        self.prefill_calls = Counter("qst_prefill_calls", "prefill calls (each --prefill-rows rows of one length "
                                     "bucket)", registry=r)
        self.decode_steps = Counter("qst_decode_steps", "decode steps (one backbone pass for every slot)", registry=r)
        self._counted = (0, 0)  # the engine's prefills and decode steps already counted
        self._lock = threading.Lock()  # the engine thread and a /metrics request both observe
        self.ttft = Histogram("qst_time_to_first_token_seconds", "submit to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("qst_time_per_output_token_seconds", "(end - first token) / (tokens - 1)",
                              buckets=LATENCY_BUCKETS, registry=r)

    def observe_engine(self, engine: Any) -> None:
        self.queue_depth.set(engine.queued)
        self.slots_busy.set(engine.busy)
        self.slots.set(engine.slots)
        with self._lock:
            prefills, steps = engine.prefills, engine.decode_steps
            self.prefill_calls.inc(prefills - self._counted[0])
            self.decode_steps.inc(steps - self._counted[1])
            self._counted = (prefills, steps)

    def finished(self, r: Any) -> None:
        """One request done (called by the engine thread, whatever its finish reason)."""
        self.finished_requests.labels(reason=r.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(r.prompt))
        self.generated_tokens.inc(len(r.tokens))
        if r.t_first is not None:
            self.ttft.observe(r.t_first - r.t_submit)
            if r.t_done is not None and len(r.tokens) > 1:
                self.tpot.observe((r.t_done - r.t_first) / (len(r.tokens) - 1))

    def text(self, engine: Any) -> bytes:
        self.observe_engine(engine)
        self.sides_loaded.set(len(engine.sides.names()) if engine.sides is not None else 0)
        self.sides_host_bytes.set(engine.sides.host_bytes() if engine.sides is not None else 0)
        self.side_device_loads.set(engine.sides.device_loads if engine.sides is not None else 0)
        return generate_latest(self.registry)
