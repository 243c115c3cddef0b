"""Readiness: one object the core hands every transport, and the only thing ``/ready`` reads.

The worker is ready while it is serving (from start-up until the first shutdown signal) and every
dependency a transport reported is up (NATS connected, say). A transport reports through the same call
whatever it depends on; the answer and the ``ingress_ready`` gauge follow at once.
"""

from __future__ import annotations


class Readiness:
    """Whether the worker wants new traffic, and if not, why."""

    def __init__(self) -> None:
        self._serving = False
        self._down: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return self._serving and not self._down

    def set_serving(self, serving: bool) -> None:
        """Start-up finished (True) or shutdown began (False); only the worker calls this."""
        self._serving = serving

    def report(self, dependency: str, up: bool, why: str = "") -> None:
        """A transport's dependency came up or went down (``why`` says how, for ``/ready``'s body)."""
        if up:
            self._down.pop(dependency, None)
        else:
            self._down[dependency] = why or "down"

    def reasons(self) -> dict[str, str]:
        """Why the worker is not ready (empty when it is)."""
        reasons = dict(self._down)
        if not self._serving:
            reasons["worker"] = "starting or shutting down"
        return reasons
