"""The worker: an endpoint registry plus the primary scope that runs every transport.

``Worker.serve`` is the one place the scope tree is built: the primary nursery holds the signal watcher,
the ops listener and one task per transport (each with its own nursery and endpoint scopes); the
shutdown coordinator runs phases 0-2 and ``serve`` performs phase 3 by cancelling the primary scope.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ._admission import Admission
from ._config import DEFAULT_MAX_INPUT_BYTES, EXIT_DRAIN_FORCED, EXIT_OK, EndpointOptions, WorkerConfig
from ._context import RuntimeContext
from ._endpoint import Endpoint, EndpointBinding, Handler, TransportBinding, bind_transport
from ._errors import EngineStartFailed, StartupFailed, describe
from ._inflight import EngineWork, GlobalInFlight, InFlightStatistics, current_engine_work
from ._logging import get_logger
from ._metrics import Metrics
from ._nursery import open_background_nursery
from ._ops_server import OpsApp, serve_ops
from ._readiness import Readiness
from ._shutdown import ShutdownCoordinator, ShutdownResult
from ._signals import watch_signals
from ._status import WorkerStatus

# A lifespan: ``async def engine(runtime): start; yield {"engine": ...}; stop`` (see Worker.lifespan).
LifespanFunction = Callable[[RuntimeContext], AsyncIterator[Mapping[str, Any] | None]]
Lifespan = Callable[[RuntimeContext], AbstractAsyncContextManager[Mapping[str, Any] | None]]


class Transport(Protocol):
    """An ingress transport. ``serve`` runs until cancelled and reports its bound address once listening."""

    @property
    def name(self) -> str: ...

    async def serve(
        self, binding: TransportBinding, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


@dataclass
class WorkerHandle:
    """Given to whoever started the worker: addresses, readiness, statistics and a way to stop it."""

    runtime: RuntimeContext
    addresses: dict[str, Any]
    _coordinator: ShutdownCoordinator
    _global: GlobalInFlight
    _bindings: list[TransportBinding]
    readiness: Readiness
    _status: WorkerStatus
    result: ShutdownResult | None = field(default=None)
    _drained: trio.Event = field(default_factory=trio.Event)

    @property
    def ready(self) -> bool:
        return self._coordinator.ready

    def shutdown(self, reason: str = "requested") -> None:
        """Start the graceful shutdown; calling it again skips the drain (like a second signal)."""
        self._coordinator.request(reason)

    async def wait_shutdown_started(self) -> None:
        """Wait for the first shutdown request (signal or ``shutdown()``): readiness is false from then."""
        await self._coordinator.wait_requested()

    async def wait_intake_closed(self) -> None:
        """Wait for phase 1: every endpoint has stopped taking new requests."""
        await self._coordinator.intake_closed.wait()

    async def wait_drained(self) -> ShutdownResult:
        """Wait until phases 0-2 are over (phase 3 follows at once); returns how the drain went."""
        await self._drained.wait()
        assert self.result is not None
        return self.result

    def statistics(self) -> InFlightStatistics:
        return self._global.statistics()

    def status(self) -> dict[str, Any]:
        """The worker's live state, as ``GET /status`` serves it (docs/operations.md, "Status")."""
        return self._status.report()

    def binding(self, transport: str, endpoint: str) -> EndpointBinding:
        """The binding of ``endpoint`` on ``transport``: its tracker, metrics and scope (for tests, ops)."""
        return next(b for b in self._bindings if b.name == transport).lookup(endpoint)

    @property
    def exit_code(self) -> int | None:
        if self.result is None:
            return None
        return EXIT_DRAIN_FORCED if self.result.forced else EXIT_OK


class Worker:
    """A set of named endpoints, served over any number of transports by ``serve`` or ``run``."""

    def __init__(self, name: str, *, asyncio: bool = False) -> None:
        self.name = name
        # Open one asyncio loop (trio-asyncio) around everything the worker runs: handlers reach
        # asyncio engines through it (runtime.engines), and the NATS transport shares it.
        self.asyncio = asyncio
        self._endpoints: dict[str, Endpoint] = {}
        self._lifespan: Lifespan | None = None
        self._health: _HealthCheck | None = None

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        return dict(self._endpoints)

    def endpoint(
        self,
        name: str | None = None,
        *,
        max_concurrency: float = math.inf,
        max_queue: int = 0,
        inactivity_timeout: float | None = None,
        duplex: bool = False,
        input_timeout: float | None = None,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        scopes: Iterable[str] = (),
        max_concurrency_per_tenant: float = math.inf,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering an endpoint; the name defaults to the function's. ``duplex=True``: a
        full-duplex exchange, an async generator taking ``(messages, ctx)`` (docs/exchanges.md).
        ``scopes``: what a caller's credential must grant; ``max_concurrency_per_tenant``: how many
        requests one tenant may run at once (docs/security.md)."""
        options = EndpointOptions(
            max_concurrency,
            max_queue,
            inactivity_timeout,
            input_timeout,
            max_input_bytes,
            frozenset(scopes),
            max_concurrency_per_tenant,
        )

        def register(handler: Handler) -> Handler:
            self.add_endpoint(name or handler.__name__, handler, options, duplex=duplex)
            return handler

        return register

    def lifespan(self, fn: LifespanFunction) -> LifespanFunction:
        """Decorator: ``fn(runtime)``, an async generator function, starts what every request shares
        (the engine), yields it as a mapping (it becomes ``runtime.state``, ``ctx.state`` in
        handlers) and stops it after its ``yield`` once the drain is over (after phase 2, before
        phase 3 closes connections). It runs in Trio, with the worker's asyncio loop open when
        ``asyncio=True`` (start an asyncio engine with ``runtime.engines.aio_call``). An exception
        before the ``yield`` fails the start-up: ``ingress serve`` exits 4."""
        if self._lifespan is not None:
            raise ValueError(f"worker {self.name!r} already has a lifespan")
        if not inspect.isasyncgenfunction(fn):
            raise TypeError(f"a lifespan is an async generator function (async def with yield), got {fn!r}")
        self._lifespan = asynccontextmanager(fn)
        return fn

    def health_check(
        self, *, interval: float = 10.0, timeout: float = 5.0
    ) -> Callable[[HealthCheckFunction], HealthCheckFunction]:
        """Decorator: ``async def check(runtime)``, asked every ``interval`` seconds once the worker
        serves (is the engine alive, can it still take work?). Returning False, raising, or taking
        longer than ``timeout`` takes the worker out of rotation (``/ready`` answers 503 and says why;
        the ``ingress_ready`` gauge reads 0) without stopping it: requests already running go on and
        ``/health`` (liveness) stays 200, so an orchestrator does not restart a worker for a passing
        hiccup. The next passing check puts it back."""
        if interval <= 0 or timeout <= 0:
            raise ValueError("a health check needs a positive interval and timeout")

        def register(fn: HealthCheckFunction) -> HealthCheckFunction:
            if self._health is not None:
                raise ValueError(f"worker {self.name!r} already has a health check")
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"a health check is an async function, got {fn!r}")
            self._health = _HealthCheck(fn, interval, timeout)
            return fn

        return register

    def add_endpoint(
        self, name: str, handler: Handler, options: EndpointOptions | None = None, *, duplex: bool = False
    ) -> None:
        if not name or "/" in name or any(c.isspace() for c in name):
            raise ValueError(f"endpoint name {name!r} must be non-empty, with no '/' or white space")
        if name in self._endpoints:
            raise ValueError(f"endpoint {name!r} is already registered on worker {self.name!r}")
        self._endpoints[name] = Endpoint.create(name, handler, options or EndpointOptions(), duplex)

    async def serve(
        self,
        transports: Sequence[Transport],
        config: WorkerConfig | None = None,
        *,
        metrics_address: tuple[str, int] | None = None,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[WorkerHandle] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Serve until shut down; returns the exit code (EXIT_OK, or EXIT_DRAIN_FORCED)."""
        if not self._endpoints:
            raise ValueError(f"worker {self.name!r} has no endpoints to serve")
        names = [t.name for t in transports]
        if len(set(names)) != len(names):
            raise ValueError(f"each transport may be given once, got {names}")
        runtime = RuntimeContext(self.name, config or WorkerConfig(), Metrics(), get_logger(worker=self.name))
        global_inflight = GlobalInFlight()
        admissions = {
            ep.name: Admission(
                ep.options.max_concurrency, ep.options.max_queue, ep.options.max_concurrency_per_tenant
            )
            for ep in self._endpoints.values()
        }
        for name, admission in admissions.items():
            runtime.metrics.track_admission(name, admission.statistics)
        readiness = Readiness()
        # Set once the lifespan (the engine) is up: requests are refused until then (runtime/_intake.py).
        engine_up = trio.Event()
        bindings = [
            bind_transport(
                t.name, runtime, self._endpoints, admissions, global_inflight, readiness, engine_up
            )
            for t in transports
        ]
        status = WorkerStatus(self.name, readiness, admissions, global_inflight)
        for binding in bindings:
            binding.status = status.report
        coordinator = ShutdownCoordinator(runtime, bindings, global_inflight, admissions.values(), readiness)
        handle = WorkerHandle(runtime, {}, coordinator, global_inflight, bindings, readiness, status)
        failure: StartupFailed | EngineStartFailed | None = None
        engine = _Lifespan(self._lifespan, runtime)
        engine_work = EngineWork()
        # The handlers' engine work is counted for this worker: what serve spawns inherits the variable.
        engine_work_token = current_engine_work.set(engine_work)
        try:
            async with self._asyncio_loop(), trio.open_nursery() as primary:
                if handle_signals:
                    await primary.start(watch_signals, coordinator, runtime)
                # A shutdown asked for while the engine or the transports are still coming up (say, a
                # NATS server that is not there yet) stops the start-up: nothing was accepted.
                with trio.CancelScope() as startup:
                    primary.start_soon(_cancel_on_shutdown, coordinator, startup)
                    try:
                        # Listeners first: during a long model load, probes get /health 200 and /ready
                        # 503, metrics can be scraped, and requests are refused retryably.
                        await _start_transports(primary, transports, bindings, handle, metrics_address)
                        runtime.logger.info("worker.listening", addresses=_printable(handle.addresses))
                        await engine.start(primary)
                        engine_up.set()
                        for binding in bindings:
                            await binding.wait_open()
                    except (StartupFailed, EngineStartFailed) as exc:
                        failure = exc
                        where = exc.transport if isinstance(exc, StartupFailed) else "engine"
                        runtime.logger.error("worker.startup_failed", transport=where, error=str(exc))
                        # Where a model load or a bind failed, for whoever runs with --log-level debug.
                        runtime.logger.debug("worker.startup_failed.traceback", exc_info=exc.__cause__ or exc)
                        primary.cancel_scope.cancel(reason="start-up failed")
                if failure is None:
                    if startup.cancelled_caught:
                        runtime.logger.info("worker.startup_aborted", started=sorted(handle.addresses))
                    else:
                        coordinator.mark_ready()
                        if self._health is not None:
                            primary.start_soon(self._health.watch, runtime, readiness)
                        runtime.logger.info(
                            "worker.ready",
                            addresses=_printable(handle.addresses),
                            endpoints=sorted(self._endpoints),
                        )
                    task_status.started(handle)
                    handle.result = await coordinator.run()
                    readiness.set_phase("stopping")
                    handle._drained.set()
                    await engine.stop(engine_work)
                    primary.cancel_scope.cancel(reason="shutdown phase 3")
        finally:
            current_engine_work.reset(engine_work_token)
        if failure is not None:
            raise failure
        assert handle.result is not None
        runtime.logger.info("worker.stopped", forced=handle.result.forced, exit_code=handle.exit_code)
        assert handle.exit_code is not None
        return handle.exit_code

    def _asyncio_loop(self) -> AbstractAsyncContextManager[Any]:
        if not self.asyncio:
            return nullcontext()
        from .engines import open_worker_loop  # trio-asyncio, only for workers that asked for it

        return open_worker_loop()

    def run(self, transports: Sequence[Transport], config: WorkerConfig | None = None, **kwargs: Any) -> int:
        """Serve from plain (non-async) code; returns the process exit code."""
        return trio.run(lambda: self.serve(transports, config, **kwargs))


@asynccontextmanager
async def open_worker(
    worker: Worker,
    transports: Sequence[Transport],
    config: WorkerConfig | None = None,
    *,
    metrics_address: tuple[str, int] | None = None,
    handle_signals: bool = False,
) -> AsyncIterator[WorkerHandle]:
    """Run ``worker`` in the background of the caller's Trio run; leaving the block shuts it down.

    Signals are left to the embedding program unless ``handle_signals`` is set.
    """
    async with open_background_nursery() as nursery:
        handle: WorkerHandle = await nursery.start(
            lambda task_status: worker.serve(
                transports,
                config,
                metrics_address=metrics_address,
                handle_signals=handle_signals,
                task_status=task_status,
            )
        )
        try:
            yield handle
        finally:
            if not handle._coordinator.shutdown_requested:
                handle.shutdown("open_worker block exited")


class _Lifespan:
    """The worker's lifespan in a task of its own: started before the transports, stopped after the
    drain. Its stop always runs, shielded and bounded by ``engine_stop_timeout``, however the worker
    ends (a drain, a transport that failed to start, a cancellation from outside). Without a lifespan
    it does nothing."""

    def __init__(self, lifespan: Lifespan | None, runtime: RuntimeContext) -> None:
        self._lifespan = lifespan
        self._runtime = runtime
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._begun = False  # the start-up may end (a transport that failed, a signal) before it

    async def start(self, nursery: trio.Nursery) -> None:
        if self._lifespan is not None:
            self._begun = True
            await nursery.start(self._run, self._lifespan)

    async def _run(self, lifespan: Lifespan, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            manager = lifespan(self._runtime)
            try:
                state = await manager.__aenter__()
            except Exception as exc:
                raise EngineStartFailed(exc) from exc
            try:
                if state is not None and not isinstance(state, Mapping):
                    raise EngineStartFailed(
                        TypeError(f"a lifespan yields a mapping (or nothing), got {type(state).__name__}")
                    )
                self._runtime.state.update(state or {})
                self._runtime.logger.info("worker.engine_started", state=sorted(self._runtime.state))
                task_status.started()
                await self._stop.wait()
            finally:
                await self._close(manager)
        finally:
            self._stopped.set()

    async def _close(self, manager: AbstractAsyncContextManager[Any]) -> None:
        """Run the lifespan's stop (the code after its yield), whatever is being cancelled around it."""
        log, limit = self._runtime.logger, self._runtime.config.engine_stop_timeout
        with trio.move_on_after(limit, shield=True) as waited:
            try:
                await manager.__aexit__(None, None, None)
                log.info("worker.engine_stopped")
            except Exception as exc:
                # The requests are over; a failing stop must not turn a clean drain into a crash.
                log.error("worker.engine_stop_failed", error=describe(exc), exc_info=exc)
        if waited.cancelled_caught:
            log.warning("worker.engine_stop_timed_out", engine_stop_timeout=limit)

    async def stop(self, engine_work: EngineWork) -> None:
        """After phase 2: once no handler uses the engine any more (after a forced drain, the killed
        ones may still be aborting their engine work, ``ABORT_TIMEOUT`` at most), run the lifespan's
        stop. A request that is only writing its last error to a slow client does not hold it."""
        if self._lifespan is None or not self._begun:
            return
        with trio.move_on_after(self._runtime.config.engine_stop_timeout):
            await engine_work.wait_idle()
        self._stop.set()
        await self._stopped.wait()


# A health check: ``async def check(runtime)``; False or an exception means unhealthy.
HealthCheckFunction = Callable[[RuntimeContext], Awaitable[bool | None]]


@dataclass(frozen=True)
class _HealthCheck:
    check: HealthCheckFunction
    interval: float
    timeout: float

    async def watch(self, runtime: RuntimeContext, readiness: Readiness) -> None:
        """Ask the check every ``interval`` until phase 3, and report each answer to readiness; a
        change is logged (``worker.unhealthy`` with why, ``worker.healthy``)."""
        log, healthy = runtime.logger, True
        while True:
            why = await self._ask(runtime)
            readiness.report("health", why is None, why or "")
            if (why is None) != healthy:
                healthy = why is None
                if healthy:
                    log.info("worker.healthy")
                else:
                    log.warning("worker.unhealthy", reason=why)
            await trio.sleep(self.interval)

    async def _ask(self, runtime: RuntimeContext) -> str | None:
        """None if the check passed, else why not."""
        with trio.move_on_after(self.timeout):
            try:
                answer = await self.check(runtime)
            except Exception as exc:
                return f"health check failed: {describe(exc)}"
            return None if answer is None or answer is True else "health check returned False"
        return f"health check took longer than {self.timeout:g} s"


def _printable(addresses: dict[str, Any]) -> dict[str, str]:
    return {
        name: f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        for name, addr in addresses.items()
    }


async def _cancel_on_shutdown(coordinator: ShutdownCoordinator, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (the start-up) when a shutdown is requested; harmless once it has ended."""
    await coordinator.wait_requested()
    scope.cancel(reason="shutdown requested during start-up")


async def _start_transports(
    primary: trio.Nursery,
    transports: Sequence[Transport],
    bindings: Sequence[TransportBinding],
    handle: WorkerHandle,
    metrics_address: tuple[str, int] | None,
) -> None:
    """Start the ops server and every transport in ``primary``; StartupFailed names the culprit."""
    if metrics_address is not None:
        app = OpsApp(handle.readiness, handle.runtime.metrics.registry, handle.status, handle.runtime.config)
        try:
            handle.addresses["metrics"] = await primary.start(serve_ops, *metrics_address, app)
        except Exception as exc:
            raise StartupFailed("metrics", exc) from exc
    for transport, binding in zip(transports, bindings, strict=True):
        try:
            handle.addresses[transport.name] = await primary.start(transport.serve, binding)
        except Exception as exc:
            raise StartupFailed(transport.name, exc) from exc
