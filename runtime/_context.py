"""Per-request and per-process contexts.

``RuntimeContext`` is built once per worker and never changes: config, metrics, logger. Anything that
belongs to one request lives in its ``RequestContext``, never in the shared one.
"""

from __future__ import annotations

import enum
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ._auth import ANONYMOUS, Principal
from ._errors import Cancelled, IngressError

if TYPE_CHECKING:
    from ._config import WorkerConfig
    from ._metrics import Metrics


# The process's prefix lets its requests be found together in logs. The rest is 64 random bits, not a
# counter: an id names a request to the stop and kill routes, so one caller must not be able to work
# out another's from its own. os.urandom(8) costs about 0.4 us; uuid4() (which also builds a UUID)
# showed in profiles of small requests.
_ID_PREFIX = secrets.token_hex(4)


def new_request_id() -> str:
    """A request id for a caller that sent none."""
    return f"{_ID_PREFIX}-{os.urandom(8).hex()}"


class KillReason(enum.Enum):
    """Why a request's scope was cancelled; decides its outcome and what (if anything) the caller hears."""

    CALLER_KILL = "cancelled"  # the caller asked (kill frame, cancel message)
    DISCONNECTED = "disconnected"  # the caller went away; nobody to tell
    SHUTDOWN = "shutdown"  # the drain deadline passed or a second signal forced it
    BAD_INPUT = "bad_input"  # an exchange's input broke on the wire (a lost message, past its credit)


@dataclass(frozen=True, slots=True)
class RuntimeContext:
    """Shared by every request of a worker for the process lifetime."""

    worker_name: str
    config: WorkerConfig
    metrics: Metrics
    logger: Any  # a structlog BoundLogger; typed loosely because structlog's types are protocols
    # What the worker's lifespan made for every request to share (the engine, say): filled once,
    # before the first request, from what the lifespan yields; read-only for handlers.
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class RequestContext:
    """What a handler knows about, and can do to, its own request.

    ``deadline`` is in ``trio.current_time()`` terms (``math.inf`` when the caller set none); the
    dispatcher enforces it with the request's cancel scope.
    """

    id: str
    endpoint: str
    transport: str
    runtime: RuntimeContext
    peer: str | None = None
    deadline: float = math.inf
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Who the request runs for (docs/security.md): the authenticated caller, or ``anonymous`` when the
    # worker checks no credentials. The credential itself is nowhere on the context.
    principal: Principal = ANONYMOUS
    # When the transport took the request, in trio.current_time() terms.
    accepted_at: float = field(default_factory=trio.current_time)
    _scope: trio.CancelScope = field(default_factory=trio.CancelScope, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _kill_reason: KillReason | None = field(default=None, repr=False)
    _kill_error: IngressError | None = field(default=None, repr=False)
    # How the caller went away (closed, reset, gone), for the disconnect metric; counted by the
    # dispatcher once, and only if the request ends that way.
    _gone_reason: str | None = field(default=None, repr=False)

    def stop_generating(self) -> None:
        """Ask a streaming handler to finish early; it should check ``is_stopped`` between chunks."""
        self._stopped = True

    def kill(self, reason: KillReason = KillReason.CALLER_KILL, error: IngressError | None = None) -> None:
        """Cancel the handler now. ``error`` is what the caller is told (unless it is gone)."""
        if self._kill_reason is None:
            self._kill_reason = reason
            self._kill_error = error or Cancelled("request cancelled by the caller")
        self._scope.cancel(reason=reason.value)

    def caller_gone(self, reason: str) -> None:
        """The transport saw the caller leave (``reason``: closed, reset, gone): cancel the handler now.
        The request ends ``disconnected`` and is counted in the disconnect metric under ``reason``,
        unless it had already ended some other way (a deadline that fired first, say)."""
        if self._gone_reason is None:
            self._gone_reason = reason
        self.kill(KillReason.DISCONNECTED)

    @property
    def is_stopped(self) -> bool:
        return self._stopped or self._kill_reason is not None

    @property
    def is_killed(self) -> bool:
        return self._kill_reason is not None

    @property
    def kill_reason(self) -> KillReason | None:
        return self._kill_reason

    @property
    def state(self) -> dict[str, Any]:
        """The worker's shared state (``runtime.state``): the engine the lifespan started, say."""
        return self.runtime.state

    def time_remaining(self) -> float:
        """Seconds until the deadline (``inf`` without one); handlers pass it on to their own calls."""
        return self.deadline - trio.current_time()
