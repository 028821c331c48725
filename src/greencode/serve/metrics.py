"""Prometheus metrics of the endpoint (``GET /metrics``), one registry per app.

Counters: requests by route and status, completions by format, prompt and generated tokens,
decode steps, layers run against what the full model would run, the sum of exit layers,
requests refused (deadline / busy / overload / timeout / shutdown), measured energy. Gauges derived from them:
mean exit layer (0-based, over decode steps), share of layers skipped, requests in flight. Histograms:
request latency per route, generation time and queue wait (submission to joining the batch).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, in_flight: Optional[Callable[[], float]] = None, energy_source: str = "unknown"):
        r = self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._exit_sum = 0.0
        self._exit_steps = 0  # decode steps of returned tokens (the exit layers reported, cut at stop strings)
        self._layers_run = 0
        self._layers_full = 0
        self.requests = Counter("greencode_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.completions = Counter("greencode_completions", "completed generations by wire format", ["format"],
                                   registry=r)
        self.prompt_tokens = Counter("greencode_prompt_tokens", "prompt tokens fed to the model (after truncation)",
                                     registry=r)
        self.generated_tokens = Counter("greencode_generated_tokens", "tokens generated", registry=r)
        self.decode_steps = Counter("greencode_decode_steps", "generated tokens after the first (the first "
                                    "comes from the full-model prefill)", registry=r)
        self.exit_layer_sum = Counter("greencode_exit_layer_sum", "sum of 0-based exit layers over decode steps",
                                      registry=r)
        self.layers_run = Counter("greencode_layers_run", "decoder layers run in decode steps", registry=r)
        self.layers_full = Counter("greencode_layers_full", "decoder layers the full model would run for the same "
                                   "decode steps", registry=r)
        self.energy = Counter("greencode_energy_joules", "measured energy of generations in joules (only "
                              "generations whose energy was measured)", registry=r)
        self.energy_measured = Counter("greencode_energy_measured_generations", "generations with measured "
                                       "energy", registry=r)
        self.rejected = Counter("greencode_rejected", "requests refused: deadline (could not finish within "
                                "serve.request_timeout_s at the measured drain rate), busy (the waiting room is "
                                "full), overload (too many requests in progress), timeout (past "
                                "serve.request_timeout_s) or shutdown", ["reason"],
                                registry=r)
        self.queue_wait_seconds = Histogram("greencode_queue_wait_seconds", "time from submission (after "
                                            "tokenizing) to joining the decoding batch",
                                            buckets=LATENCY_BUCKETS_S, registry=r)
        self.request_seconds = Histogram("greencode_request_latency_seconds", "server time per request",
                                         ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.generation_seconds = Histogram("greencode_generation_seconds", "time inside the decoding loop per "
                                            "generation", buckets=LATENCY_BUCKETS_S, registry=r)
        Gauge("greencode_mean_exit_layer", "mean 0-based exit layer over all decode steps so far", registry=r
              ).set_function(lambda: self._exit_sum / self._exit_steps if self._exit_steps else float("nan"))
        Gauge("greencode_layers_skipped_share", "share of decoder layers skipped in decode steps so far",
              registry=r).set_function(lambda: 1 - self._layers_run / self._layers_full if self._layers_full
                                       else float("nan"))
        if in_flight is not None:
            Gauge("greencode_requests_in_flight", "generation requests running or queued", registry=r
                  ).set_function(in_flight)
        Gauge("greencode_energy_source_info", "where energy numbers come from (label)", ["source"],
              registry=r).labels(source=energy_source).set(1)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def observe_completion(self, fmt: str, stats: dict, num_layers: int) -> None:
        steps = int(stats.get("decode_steps") or 0)
        exits = stats.get("exit_layers") or []
        layers_run = int(stats.get("layers_run") or 0)
        with self._lock:
            self._exit_sum += float(sum(exits[1:]))
            self._exit_steps += max(0, len(exits) - 1)
            self._layers_run += layers_run
            self._layers_full += steps * num_layers
        self.completions.labels(format=fmt).inc()
        self.prompt_tokens.inc(int(stats.get("prompt_tokens") or 0))
        self.generated_tokens.inc(int(stats.get("completion_tokens") or 0))
        self.decode_steps.inc(steps)
        self.exit_layer_sum.inc(float(sum(exits[1:])))
        self.layers_run.inc(layers_run)
        self.layers_full.inc(steps * num_layers)
        if stats.get("generation_s") is not None:
            self.generation_seconds.observe(float(stats["generation_s"]))
        if stats.get("energy_j") is not None:
            self.energy.inc(float(stats["energy_j"]))
            self.energy_measured.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
