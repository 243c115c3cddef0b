"""Prometheus metrics for a worker, in a registry of its own so several workers can share a process.

Label children for each (endpoint, transport) are looked up once, when the endpoint is bound, because
``labels()`` takes a lock and a dict lookup that the per-request path should not pay.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
