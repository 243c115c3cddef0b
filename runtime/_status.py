"""A worker's live state as one JSON object: ``GET /status`` on the ops listener (and the HTTP
transport's port), printed by ``ingress status``. The keys are documented in docs/operations.md
("Status"); a router or an operator reads it, so they only ever grow."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import trio

from ._admission import Admission
from ._inflight import GlobalInFlight
from ._readiness import Readiness


class WorkerStatus:
    """Reads the worker's own counters when asked; holds nothing of its own but the start time."""

    def __init__(
        self,
        worker: str,
        readiness: Readiness,
        admissions: Mapping[str, Admission],
        global_inflight: GlobalInFlight,
    ) -> None:
        self._worker = worker
        self._readiness = readiness
        self._admissions = dict(admissions)
        self._global = global_inflight
        self._started_at = trio.current_time()

    def report(self) -> dict[str, Any]:
        endpoints = {}
        for name, admission in sorted(self._admissions.items()):
            stats = admission.statistics()
            endpoints[name] = {
                "running": stats.running,
                "queued": stats.queued,
                # JSON has no infinity: no limit is null.
                "max_concurrency": None if math.isinf(stats.max_concurrency) else int(stats.max_concurrency),
                "max_queue": stats.max_queue,
            }
        return {
            "worker": self._worker,
            "phase": self._readiness.phase,
            "ready": self._readiness.ready,
            "not_ready_because": self._readiness.reasons(),
            "uptime_s": round(trio.current_time() - self._started_at, 3),
            "in_flight": self._global.count,
            "endpoints": endpoints,
        }
