"""Endpoints, and their bindings to transports: the seam between the core and every transport.

A worker registers ``Endpoint``s. When it starts serving, each transport gets a ``TransportBinding``
holding one ``EndpointBinding`` per endpoint: that pair's endpoint scope, in-flight tracker and metric
children. The shutdown coordinator closes and waits on bindings; transports hand each request to the
core's intake (runtime/_intake.py), which looks it up here, with a ``ResponseSink`` that knows the wire.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ._admission import Admission
from ._config import EndpointOptions
from ._context import RequestContext, RuntimeContext
from ._errors import IngressError, NotFound
from ._inflight import GlobalInFlight, InFlight, InFlightStatistics
from ._metrics import BindingMetrics
from ._readiness import Readiness

Handler = Callable[[Any, RequestContext], Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A registered handler: an async generator function streams, a coroutine function answers once; a
    duplex one (an async generator taking ``(messages, ctx)``) is a full-duplex exchange."""

    name: str
    handler: Handler
    options: EndpointOptions
    streaming: bool  # decided once here, not per request
    duplex: bool = False

    @classmethod
    def create(cls, name: str, handler: Handler, options: EndpointOptions, duplex: bool = False) -> Endpoint:
        streaming = inspect.isasyncgenfunction(handler)
        if duplex and not streaming:
            raise TypeError(
                f"endpoint {name!r}: a duplex handler is an async generator taking (messages, ctx), "
                f"got {handler!r}"
            )
        if not (streaming or inspect.iscoroutinefunction(handler)):
            raise TypeError(
                f"endpoint {name!r}: handler must be an 'async def' function or an async generator, "
                f"got {handler!r}"
            )
        return cls(name, handler, options, streaming, duplex)


class CallerGone(Exception):
    """Raised by a sink when the caller can no longer be reached; the dispatcher records a disconnect."""


class ResponseSink(Protocol):
    """How the dispatcher answers a caller; each transport implements it for its wire format.

    A streaming request ends with exactly one ``send_end`` or ``send_error``, a unary one with one
    ``send_result`` or ``send_error``, unless the caller is gone.
    ``send_chunk`` applies back-pressure: it blocks while the caller is behind.
    Chunks and results arrive as compact JSON already (the core encodes them, runtime/_payload.py):
    a sink frames bytes and never sees a value that is not JSON.
    """

    async def send_chunk(self, data: bytes) -> None: ...

    async def send_end(self, chunks: int) -> None:
        """A stream ended cleanly after ``chunks`` chunks (the core counts them; a wire that carries
        the count, SSE's end event or NATS's end message, takes it from here)."""
        ...

    async def send_result(self, data: bytes) -> None:
        """A unary endpoint's whole answer: the transport sends it as one response (TCP: DATA + END)."""
        ...

    async def send_error(self, error: IngressError, retryable: bool) -> None: ...


class EndpointBinding:
    """One endpoint served on one transport."""

    def __init__(
        self,
        endpoint: Endpoint,
        transport: str,
        admission: Admission,
        tracker: InFlight[RequestContext],
        metrics: BindingMetrics,
        logger: Any,
        access_log: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.transport = transport
        self.admission = admission
        self.tracker = tracker
        self.metrics = metrics
        self.logger = logger.bind(endpoint=endpoint.name, transport=transport)
        self.access_log = access_log
        # Read at scrape time: no per-request cost, and it can never drift from the tracker.
        metrics.inflight.set_function(lambda: self.tracker.count)
        # The endpoint scope: a transport with a per-endpoint intake (a subscription) runs it inside
        # this scope; for every transport the core's intake refuses new requests once it is cancelled.
        self.scope = trio.CancelScope()

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def accepting(self) -> bool:
        return not self.scope.cancel_called

    def accept(self, ctx: RequestContext) -> None:
        """Count ``ctx`` in flight from this moment (the intake's ``Caller.open`` calls it before the
        transport spawns the request's task, so the drain can never see zero while one is on its way);
        the dispatcher releases it. Idempotent."""
        self.tracker.enter(ctx)

    def release(self, ctx: RequestContext) -> None:
        self.tracker.exit(ctx)

    def close(self) -> None:
        """Stop taking new requests on this endpoint (phase 1); those in flight go on."""
        self.scope.cancel(reason="shutdown: endpoint closed")

    def statistics(self) -> InFlightStatistics:
        return self.tracker.statistics()


class TransportBinding:
    """Everything one transport gets from the core, the same for every transport: the runtime, its
    endpoint bindings, the start signal (``started``: the engine is up), the drain signal
    (``intake_closed``, and each endpoint's scope) and the worker's ``readiness``, where it reports its
    own dependencies (NATS connected, say)."""

    def __init__(
        self,
        name: str,
        runtime: RuntimeContext,
        endpoints: Mapping[str, EndpointBinding],
        readiness: Readiness | None = None,
        started: trio.Event | None = None,
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.endpoints = dict(endpoints)
        # Set once the worker's start-up (its lifespan: the engine) is over. Listeners open before it,
        # so that probes and metrics work during a long model load; requests are refused until it is
        # set (UNAVAILABLE, retryable), and a transport that would otherwise draw traffic (NATS
        # subscriptions) waits for it. Without a worker around the binding (tests): set from the start.
        if started is None:
            started = trio.Event()
            started.set()
        self.started = started
        self._open_deferred = False
        self._opened = trio.Event()
        # Set once every endpoint of this transport is closed (phase 1): shared listeners stop on it.
        self.intake_closed = trio.Event()
        self.readiness = readiness if readiness is not None else Readiness()
        # The worker's live state for ``/status`` (a WorkerStatus's report), set by the worker.
        self.status: Callable[[], dict[str, Any]] | None = None

    def lookup(self, endpoint: str) -> EndpointBinding:
        try:
            return self.endpoints[endpoint]
        except KeyError:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise NotFound(f"no endpoint named {endpoint!r} (this worker serves: {known})") from None

    def defer_open(self) -> None:
        """For a transport that takes requests only some time after ``started`` (NATS subscribes
        then): call it before reporting its address, and ``opened()`` once requests can reach it. The
        worker says it is ready only after that."""
        self._open_deferred = True

    def opened(self) -> None:
        self._opened.set()

    async def wait_open(self) -> None:
        """Once ``started`` is set: until requests can reach this transport (at once for most)."""
        if self._open_deferred:
            await self._opened.wait()

    def close_intake(self) -> None:
        for binding in self.endpoints.values():
            binding.close()
        self.intake_closed.set()


def bind_transport(
    name: str,
    runtime: RuntimeContext,
    endpoints: Mapping[str, Endpoint],
    admissions: Mapping[str, Admission],
    global_inflight: GlobalInFlight,
    readiness: Readiness | None = None,
    started: trio.Event | None = None,
) -> TransportBinding:
    """Build the bindings of ``endpoints`` on transport ``name``."""
    bindings = {
        ep.name: EndpointBinding(
            ep,
            name,
            admissions[ep.name],
            InFlight(global_inflight),
            runtime.metrics.for_binding(ep.name, name),
            runtime.logger,
            runtime.config.access_log,
        )
        for ep in endpoints.values()
    }
    return TransportBinding(name, runtime, bindings, readiness, started)
