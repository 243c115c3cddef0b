"""Worker settings. Every timeout the runtime applies is a named field here, never an ad hoc argument."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._auth import Authenticator

# Exit codes. FORCED is deliberately not 1 (generic failure), 137 (SIGKILL) or 143 (SIGTERM default):
# an operator must be able to tell "drained, but had to kill requests" from a crash or an OOM kill.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DRAIN_FORCED = 3
# The worker's lifespan (its engine) failed to start: a supervisor may want to tell a model that will
# not load from a crash.
EXIT_ENGINE_FAILED = 4


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Process-wide settings, fixed for the worker's lifetime (they live in the RuntimeContext)."""

    # Upper bound on the whole drain, fixed when the first signal arrives (phases 0-2 together).
    drain_timeout: float = 30.0
    # Phase 0: keep serving with readiness false so load balancers stop routing here first.
    shutdown_delay: float = 0.0
    # After a forced drain kills the stragglers: time for their error frames to reach callers
    # before phase 3 closes every connection.
    kill_grace: float = 1.0
    # How often the drain logs a progress line (design: at least once a second).
    progress_interval: float = 1.0
    # One canonical log line per request (like uvicorn's access log); off for benchmarks.
    access_log: bool = True
    # After the drain (phase 2), how long the lifespan's shutdown (the engine's stop) may take before
    # phase 3 cancels it.
    engine_stop_timeout: float = 30.0
    # Who may call (docs/security.md): every request's credential goes through it (``TokenFile``, or
    # your own check); None: nobody is asked for one, and every caller is ``anonymous``.
    authenticator: Authenticator | None = None
    # When set, /metrics answers only a credential granting this scope (401/403 otherwise); /health,
    # /ready and /status stay open for probes (docs/security.md).
    metrics_scope: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "drain_timeout",
            "shutdown_delay",
            "kill_grace",
            "progress_interval",
            "engine_stop_timeout",
        ):
            value = getattr(self, name)
            if not (value >= 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        if self.progress_interval == 0:
            raise ValueError("progress_interval must be positive")


# An exchange's inbound messages waiting for its handler, in bytes, before the caller is held back.
DEFAULT_MAX_INPUT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class EndpointOptions:
    """Per-endpoint limits, set where the endpoint is registered."""

    max_concurrency: float = math.inf
    max_queue: int = 0
    # Kill a stream that yields nothing for this long (seconds); None turns the check off.
    inactivity_timeout: float | None = None
    # Exchanges (duplex endpoints): end one whose caller sent nothing for this long (seconds; None: off),
    # and hold a caller back once this many bytes of its messages wait for the handler.
    input_timeout: float | None = None
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    # Scopes a caller's credential must carry (PERMISSION_DENIED otherwise; docs/security.md).
    scopes: frozenset[str] = frozenset()
    # The most requests one tenant may run at once (docs/security.md "Fair admission"); inf: no cap.
    max_concurrency_per_tenant: float = math.inf

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if self.inactivity_timeout is not None and not self.inactivity_timeout > 0:
            raise ValueError("inactivity_timeout must be positive seconds or None")
        if self.input_timeout is not None and not self.input_timeout > 0:
            raise ValueError("input_timeout must be positive seconds or None")
        if self.max_concurrency_per_tenant < 1:
            raise ValueError("max_concurrency_per_tenant must be at least 1")
        if not 1 <= self.max_input_bytes <= 0xFFFFFFFF:  # a TCP WINDOW_UPDATE carries it in 32 bits
            raise ValueError("max_input_bytes must be from 1 to 2**32-1")
