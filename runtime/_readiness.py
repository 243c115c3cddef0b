"""Readiness: one object the core hands every transport, and the only thing ``/ready`` reads.

The worker is ready while it is serving (from the end of its start-up, the engine up, until the first
shutdown signal), every dependency a transport reported is up (NATS connected, say) and the user's
health check, if any, passes. Whoever owns a dependency reports it through the same call; the answer
and the ``ingress_ready`` gauge follow at once. ``/health`` (liveness) reads none of this.
"""

from __future__ import annotations

from typing import Literal

Phase = Literal["starting", "serving", "draining", "stopping"]

_PHASE_REASONS = {
    "starting": "starting: the engine is not up yet",
    "draining": "draining: shutting down",
    "stopping": "stopping: the drain is over",
}


class Readiness:
    """Whether the worker wants new traffic, and if not, why."""

    def __init__(self) -> None:
        self._phase: Phase = "starting"
        self._down: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return self._phase == "serving" and not self._down

    @property
    def phase(self) -> Phase:
        """``starting`` (listeners open, engine loading), ``serving``, ``draining`` (shutdown began) or
        ``stopping`` (the drain is over: the engine stops, then the listeners close)."""
        return self._phase

    def set_phase(self, phase: Phase) -> None:
        """The worker's lifecycle moved on; only the worker calls this."""
        self._phase = phase

    def report(self, dependency: str, up: bool, why: str = "") -> None:
        """A dependency came up or went down (``why`` says how, for ``/ready``'s body)."""
        if up:
            self._down.pop(dependency, None)
        else:
            self._down[dependency] = why or "down"

    def reasons(self) -> dict[str, str]:
        """Why the worker is not ready (empty when it is)."""
        reasons = dict(self._down)
        if self._phase in _PHASE_REASONS:
            reasons["worker"] = _PHASE_REASONS[self._phase]
        return reasons
