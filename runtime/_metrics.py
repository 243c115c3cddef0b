"""Prometheus metrics for a worker, in a registry of its own so several workers can share a process.

Label children for each (endpoint, transport) are looked up once, when the endpoint is bound, because
``labels()`` takes a lock and a dict lookup that the per-request path should not pay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ._admission import AdmissionStatistics

OUTCOMES = ("ok", "error", "cancelled", "disconnected", "rejected", "shutdown")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Every metric the runtime exports, prefixed ``ingress_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("endpoint", "transport")
        r = self.registry
        self.inflight = Gauge("ingress_inflight_requests", "Requests in flight.", labels, registry=r)
        self.requests = Counter(
            "ingress_requests", "Requests finished, by outcome.", (*labels, "outcome"), registry=r
        )
        self.duration = Histogram(
            "ingress_request_duration_seconds",
            "Time from accept to last byte.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfc = Histogram(
            "ingress_time_to_first_chunk_seconds",
            "Time from accept to the first chunk.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.disconnects = Counter(
            "ingress_client_disconnects",
            "Callers that went away mid-request.",
            (*labels, "reason"),
            registry=r,
        )
        self.rejections = Counter(
            "ingress_rejections", "Requests turned away before running.", (*labels, "reason"), registry=r
        )
        self.inactivity = Counter(
            "ingress_inactivity_timeouts",
            "Streams killed for yielding nothing within inactivity_timeout.",
            labels,
            registry=r,
        )
        self.messages = Counter(
            "ingress_exchange_messages",
            "Messages of full-duplex exchanges, by direction (received from callers, sent to them).",
            (*labels, "direction"),
            registry=r,
        )
        self.protocol_errors = Counter(
            "ingress_protocol_errors", "Connections closed for malformed input.", ("transport",), registry=r
        )
        self.shutdown_phase = Gauge(
            "ingress_shutdown_phase_seconds", "How long each shutdown phase took.", ("phase",), registry=r
        )
        self.draining_inflight = Gauge(
            "ingress_shutdown_inflight_requests",
            "In-flight requests when each phase ended.",
            ("phase",),
            registry=r,
        )
        self.drain_forced = Gauge(
            "ingress_shutdown_drain_forced", "1 when the drain had to kill requests.", registry=r
        )
        self.ready = Gauge("ingress_ready", "1 while the worker accepts new requests.", registry=r)
        # Load signals per endpoint (every transport together), read from its admission at scrape time:
        # what a router or an autoscaler (a Kubernetes HPA on custom metrics) acts on.
        self.running = Gauge(
            "ingress_endpoint_running", "Requests holding an admission slot.", ("endpoint",), registry=r
        )
        self.queued = Gauge(
            "ingress_endpoint_queued", "Requests waiting for an admission slot.", ("endpoint",), registry=r
        )
        self.capacity = Gauge(
            "ingress_endpoint_capacity",
            "The endpoint's max_concurrency (+Inf when it has none).",
            ("endpoint",),
            registry=r,
        )
        self.saturation = Gauge(
            "ingress_endpoint_saturation",
            "(running + queued) / max_concurrency; 0 for an endpoint without a limit.",
            ("endpoint",),
            registry=r,
        )

    def track_admission(self, endpoint: str, statistics: Callable[[], AdmissionStatistics]) -> None:
        """Export ``endpoint``'s load, read from ``statistics()`` at each scrape."""
        self.running.labels(endpoint).set_function(lambda: statistics().running)
        self.queued.labels(endpoint).set_function(lambda: statistics().queued)
        self.capacity.labels(endpoint).set_function(lambda: statistics().max_concurrency)
        self.saturation.labels(endpoint).set_function(lambda: _saturation(statistics()))

    def for_binding(self, endpoint: str, transport: str) -> BindingMetrics:
        return BindingMetrics(
            inflight=self.inflight.labels(endpoint, transport),
            duration=self.duration.labels(endpoint, transport),
            ttfc=self.ttfc.labels(endpoint, transport),
            inactivity=self.inactivity.labels(endpoint, transport),
            outcomes={o: self.requests.labels(endpoint, transport, o) for o in OUTCOMES},
            _metrics=self,
            _labels=(endpoint, transport),
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of this worker's registry."""
        return generate_latest(self.registry)


def _saturation(stats: AdmissionStatistics) -> float:
    if math.isinf(stats.max_concurrency) or stats.max_concurrency <= 0:
        return 0.0
    return (stats.running + stats.queued) / stats.max_concurrency


@dataclass(frozen=True, slots=True)
class BindingMetrics:
    """The metric children of one (endpoint, transport), resolved once."""

    inflight: Gauge
    duration: Histogram
    ttfc: Histogram
    inactivity: Counter
    outcomes: dict[str, Counter]
    _metrics: Metrics
    _labels: tuple[str, str]

    def disconnect(self, reason: str) -> None:
        self._metrics.disconnects.labels(*self._labels, reason).inc()

    def rejection(self, reason: str) -> None:
        self._metrics.rejections.labels(*self._labels, reason).inc()

    def exchange_messages(self, *, received: int, sent: int) -> None:
        messages = self._metrics.messages
        messages.labels(*self._labels, "received").inc(received)
        messages.labels(*self._labels, "sent").inc(sent)
