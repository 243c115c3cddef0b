"""The three-phase shutdown coordinator.

0. (optional) ``shutdown_delay``: readiness turns false, serving goes on, so load balancers stop routing.
1. Close every endpoint scope (intake stops; queued callers are told SHUTTING_DOWN, retryable) and wait
   for each endpoint's in-flight count to reach zero.
2. Wait for the global in-flight count to reach zero.
3. Return, so the worker cancels the primary scope (connections close, transports stop).

All of phases 0-2 run inside one *drain scope* whose deadline (``drain_timeout``) is fixed when shutdown
is requested, and which a second request cancels outright: no wait can outlive it. If anything is still
running when the drain scope ends, it is killed with SHUTTING_DOWN and given ``kill_grace`` seconds for
the error to reach its caller; the drain then counts as forced.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from ._admission import Admission
from ._context import KillReason, RuntimeContext
from ._endpoint import TransportBinding
from ._errors import ShuttingDown
from ._inflight import GlobalInFlight
from ._readiness import Readiness


@dataclass(frozen=True, slots=True)
class ShutdownResult:
    """How the drain went: ``forced`` means requests had to be killed (exit code EXIT_DRAIN_FORCED)."""

    forced: bool
    killed: int
    reason: str
    elapsed: float


class ShutdownCoordinator:
    """Drives the phases; ``request()`` starts them, a second ``request()`` skips the drain."""

    def __init__(
        self,
        runtime: RuntimeContext,
        transports: Sequence[TransportBinding],
        global_inflight: GlobalInFlight,
        admissions: Iterable[Admission],
        readiness: Readiness,
    ) -> None:
        self._runtime = runtime
        self._config = runtime.config
        self._log = runtime.logger
        self._transports = list(transports)
        self._global = global_inflight
        self._admissions = list(admissions)
        self._requested = trio.Event()
        self._drain_scope = trio.CancelScope()
        self._reason = ""
        self._requested_at = math.inf
        self._readiness = readiness
        # 0 while starting and draining, like /ready.
        runtime.metrics.ready.set_function(lambda: 1 if readiness.ready else 0)
        self._skipped = False
        self.intake_closed = trio.Event()

    @property
    def ready(self) -> bool:
        """True while the worker wants new traffic (the readiness probe): serving, not shutting down,
        and every dependency a transport reported is up."""
        return self._readiness.ready

    @property
    def shutdown_requested(self) -> bool:
        return self._requested.is_set()

    def mark_ready(self) -> None:
        """The start-up is over (the engine is up): serving, unless a shutdown was already asked for."""
        if not self._requested.is_set():
            self._readiness.set_phase("serving")

    def request(self, reason: str) -> None:
        """Start the shutdown; called again while draining, skip the rest of the drain."""
        if self._requested.is_set():
            self._log.warning("shutdown.drain_skipped", reason=reason, in_flight=self._global.count)
            self._skipped = True
            self._drain_scope.cancel(reason=f"drain skipped: {reason}")
            return
        self._reason = reason
        self._requested_at = trio.current_time()
        self._drain_scope.deadline = self._requested_at + self._config.drain_timeout
        self._readiness.set_phase("draining")
        self._log.info(
            "shutdown.requested",
            reason=reason,
            in_flight=self._global.count,
            drain_timeout=self._config.drain_timeout,
            shutdown_delay=self._config.shutdown_delay,
        )
        self._requested.set()

    async def wait_requested(self) -> None:
        await self._requested.wait()

    async def run(self) -> ShutdownResult:
        """Wait for a request, then run phases 0-2; the caller performs phase 3 on return."""
        await self._requested.wait()
        with self._drain_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_progress)
                await self._phase("0", self._delay)
                await self._phase("1", self._drain_endpoints)
                await self._phase("2", self._global.wait_idle)
                nursery.cancel_scope.cancel(reason="drained")
        killed = await self._kill_stragglers()
        return self._finish(killed)

    async def _phase(self, phase: str, body: Callable[[], Awaitable[None]]) -> None:
        started = trio.current_time()
        try:
            await body()
        finally:
            elapsed = trio.current_time() - started
            self._runtime.metrics.shutdown_phase.labels(phase).set(elapsed)
            self._runtime.metrics.draining_inflight.labels(phase).set(self._global.count)
            self._log.info(
                f"shutdown.phase{phase}.done", in_flight=self._global.count, elapsed=round(elapsed, 3)
            )

    async def _delay(self) -> None:
        if self._config.shutdown_delay > 0:
            await trio.sleep(self._config.shutdown_delay)

    async def _drain_endpoints(self) -> None:
        for admission in self._admissions:
            admission.close()
        for transport in self._transports:
            transport.close_intake()
        self.intake_closed.set()
        self._log.info("shutdown.intake_closed", in_flight=self._global.count)
        for transport in self._transports:
            for binding in transport.endpoints.values():
                await binding.tracker.wait_idle()
                self._log.info(
                    "shutdown.endpoint_drained",
                    endpoint=binding.name,
                    transport=binding.transport,
                    elapsed=round(trio.current_time() - self._requested_at, 3),
                )

    async def _report_progress(self) -> None:
        while True:
            await trio.sleep(self._config.progress_interval)
            per_endpoint = {
                f"{b.transport}/{b.name}": b.tracker.count
                for t in self._transports
                for b in t.endpoints.values()
                if b.tracker.count
            }
            self._log.info(
                "shutdown.progress",
                in_flight=self._global.count,
                endpoints=per_endpoint,
                elapsed=round(trio.current_time() - self._requested_at, 3),
                remaining=round(self._drain_scope.deadline - trio.current_time(), 3),
            )

    async def _kill_stragglers(self) -> int:
        """Kill whatever is still running and give the errors ``kill_grace`` to reach the callers."""
        if self._global.count == 0:
            return 0
        killed = 0
        for transport in self._transports:
            for binding in transport.endpoints.values():
                for ctx in binding.tracker.active():
                    ctx.kill(
                        KillReason.SHUTDOWN, ShuttingDown("worker shut down before the request finished")
                    )
                    killed += 1
        why = "second request" if self._skipped else "drain_timeout expired"
        self._log.warning("shutdown.drain_forced", killed=killed, why=why)
        with trio.move_on_after(self._config.kill_grace):
            await self._global.wait_idle()
        return killed

    def _finish(self, killed: int) -> ShutdownResult:
        forced = killed > 0
        elapsed = trio.current_time() - self._requested_at
        self._runtime.metrics.drain_forced.set(1 if forced else 0)
        self._log.info("shutdown.phase3.started", forced=forced, killed=killed, elapsed=round(elapsed, 3))
        return ShutdownResult(forced=forced, killed=killed, reason=self._reason, elapsed=elapsed)
