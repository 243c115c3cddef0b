"""The NATS services protocol ("micro": ``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``), so that the
ecosystem's own tooling (``nats micro ls/info/stats``) and any router that speaks it see a fleet of
workers: each worker is one instance of a service named after the worker, its endpoints are the
service's endpoints (subject and queue group as the NATS transport serves them). Replies are built with
nats-py's own micro types (``nats.micro.service``), so their shape is the one the tooling parses.
docs/protocol-nats.md, "Discovery".
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.micro.service import EndpointInfo, EndpointStats, ServiceInfo, ServicePing, ServiceStats
from prometheus_client import CollectorRegistry

VERBS = ("PING", "INFO", "STATS")
DESCRIPTION = "a trio-ingress worker"


def service_name(worker: str) -> str:
    """The worker's name as a service name (letters, digits, ``-`` and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", worker) or "ingress"


def _version() -> str:
    try:
        return importlib.metadata.version("trio-ingress")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without an install
        return "0.0.0"


@dataclass(frozen=True)
class ServiceEndpoint:
    name: str
    subject: str  # also its queue group


@dataclass(frozen=True)
class Service:
    """One worker as one instance of the service; ``reply(subject)`` answers a ``$SRV`` request."""

    name: str
    id: str
    endpoints: Sequence[ServiceEndpoint]
    registry: CollectorRegistry
    transport: str
    started: datetime
    version: str = _version()

    @classmethod
    def create(
        cls,
        worker: str,
        service_id: str,
        endpoints: Sequence[ServiceEndpoint],
        registry: CollectorRegistry,
        transport: str,
    ) -> Service:
        started = datetime.now(UTC).replace(tzinfo=None)
        return cls(service_name(worker), service_id, tuple(endpoints), registry, transport, started)

    def subjects(self) -> list[str]:
        """Every subject an instance answers: all services, this service, this instance."""
        suffixes = ("", f".{self.name}", f".{self.name}.{self.id}")
        return [f"$SRV.{verb}{suffix}" for verb in VERBS for suffix in suffixes]

    def reply(self, subject: str) -> dict[str, Any]:
        verb = subject.split(".")[1]
        if verb == "PING":
            return ServicePing(id=self.id, name=self.name, version=self.version).to_dict()
        if verb == "INFO":
            endpoints = [EndpointInfo(e.name, e.subject, e.subject) for e in self.endpoints]
            info = ServiceInfo(
                name=self.name, id=self.id, version=self.version, description=DESCRIPTION, endpoints=endpoints
            )
            return info.to_dict()
        stats = ServiceStats(
            id=self.id,
            name=self.name,
            version=self.version,
            started=self.started,
            endpoints=[self._stats(e) for e in self.endpoints],
        )
        return stats.to_dict()

    def _stats(self, endpoint: ServiceEndpoint) -> EndpointStats:
        """From the worker's own metrics: requests finished over NATS, errors, time spent."""
        labels = {"endpoint": endpoint.name, "transport": self.transport}
        requests = self._sample("ingress_request_duration_seconds_count", labels)
        seconds = self._sample("ingress_request_duration_seconds_sum", labels)
        errors = self._sample("ingress_requests_total", {**labels, "outcome": "error"})
        total_ns = int(seconds * 1e9)
        return EndpointStats(
            name=endpoint.name,
            subject=endpoint.subject,
            queue_group=endpoint.subject,
            num_requests=int(requests),
            num_errors=int(errors),
            processing_time=total_ns,
            average_processing_time=total_ns // int(requests) if requests else 0,
        )

    def _sample(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0
