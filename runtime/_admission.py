"""Admission control for one endpoint: a concurrency limit with a bounded queue, fair across tenants.

One ``Admission`` is shared by every transport serving the endpoint, because the limit protects the
handler's resources, not a socket. A caller that cannot start at once waits in the queue until its
deadline; a full queue rejects at once; a caller cancelled while queued leaves the queue at once; and
``close()`` (shutdown phase 1) turns every queued caller away with a retryable SHUTTING_DOWN, since none
of them has started any work.

The queue is fair across tenants (the request principal's, docs/security.md "Fair admission"): each
tenant waits in a queue of its own, and a freed slot goes to the waiter with the smallest virtual finish
time (weighted fair queueing by request, each tenant's share in proportion to its weight), so one
tenant's burst delays the others by its fair share only. Within a tenant the order is FIFO; with one
tenant it is plain FIFO. A full queue makes room for a tenant with fewer waiters by turning away the
newest waiter of the tenant with the most; ``tenant_limit`` caps the slots one tenant holds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ._errors import DeadlineExceeded, IngressError, Overloaded, ShuttingDown

# The tenant of every request when authentication is off (runtime/_auth.py ANONYMOUS).
ANONYMOUS_TENANT = "anonymous"


class Rejected(IngressError):
    """Admission said no. ``reason`` is the metrics label; ``error`` is what the caller is told."""

    def __init__(self, reason: str, error: IngressError) -> None:
        super().__init__(error.message, retryable=error.retryable)
        self.reason = reason
        self.error = error
        self.code = error.code


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    running: int
    queued: int
    max_concurrency: float
    max_queue: int


class _Waiter:
    __slots__ = ("error", "event", "granted", "tag", "tenant")

    def __init__(self, tenant: str, tag: float) -> None:
        self.event = trio.Event()
        self.granted = False
        self.error: Rejected | None = None
        self.tenant = tenant
        self.tag = tag  # its virtual finish time: the queue serves the smallest first


class Admission:
    """``async with admission.slot(deadline, tenant, weight):`` runs the block holding one of
    ``max_concurrency`` slots; ``tenant_limit`` caps the slots one tenant may hold at once."""

    def __init__(
        self, max_concurrency: float = math.inf, max_queue: int = 0, tenant_limit: float = math.inf
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if tenant_limit < 1:
            raise ValueError("the per-tenant limit must be at least 1")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.tenant_limit = tenant_limit
        # Holdings per tenant are kept only under a limit: without one the hot path skips them.
        self._limited = not math.isinf(tenant_limit)
        self._running = 0
        # Per tenant: its waiters in arrival order, the slots it holds (kept only under a tenant
        # limit), and the virtual finish time of its newest waiter.
        self._queues: dict[str, deque[_Waiter]] = {}
        self._queued = 0
        self._holding: dict[str, int] = {}
        self._finish: dict[str, float] = {}
        self._virtual = 0.0  # the tag of the waiter served last: newcomers start from here
        self._closed = False

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(self._running, self._queued, self.max_concurrency, self.max_queue)

    @asynccontextmanager
    async def slot(
        self, deadline: float = math.inf, tenant: str = ANONYMOUS_TENANT, weight: float = 1.0
    ) -> AsyncIterator[None]:
        await self.acquire(deadline, tenant, weight)
        try:
            yield
        finally:
            self.release(tenant)

    async def acquire(
        self, deadline: float = math.inf, tenant: str = ANONYMOUS_TENANT, weight: float = 1.0
    ) -> None:
        """Take a slot, queueing until ``deadline`` if none is free; pair with ``release(tenant)``."""
        if self._closed:
            raise Rejected("shutting_down", ShuttingDown("worker is shutting down", retryable=True))
        if self._running < self.max_concurrency and self._may_start_now(tenant):
            self._running += 1
            self._hold(tenant, 1)
            return
        if self._queued >= self.max_queue and not self._displace_for(tenant):
            raise self._refusal(tenant)
        await self._wait_in_queue(deadline, tenant, weight)

    def _may_start_now(self, tenant: str) -> bool:
        if not self._queued and not self._limited:
            return True  # the common case, kept cheap
        return self._below_limit(tenant) and self._next_waiter() is None

    def _below_limit(self, tenant: str) -> bool:
        return self._holding.get(tenant, 0) < self.tenant_limit

    def _hold(self, tenant: str, change: int) -> None:
        if self._limited:
            holding = self._holding.get(tenant, 0) + change
            if holding:
                self._holding[tenant] = holding
            else:
                self._holding.pop(tenant, None)  # one entry per tenant ever seen would only grow

    def _refusal(self, tenant: str) -> Rejected:
        if not self._below_limit(tenant) and self.max_queue == 0:
            return Rejected(
                "tenant_limit",
                Overloaded(f"tenant {tenant!r} is at its limit ({self.tenant_limit:g} running)"),
            )
        limit = f"{self.max_concurrency:g} running, {self.max_queue} queued"
        return Rejected("overloaded", Overloaded(f"endpoint is at capacity ({limit})"))

    def _displace_for(self, tenant: str) -> bool:
        """The queue is full: a tenant with fewer waiters than the one with the most takes that
        tenant's newest place (it is told OVERLOADED, retryable), so one tenant's burst cannot fill the
        queue against everyone else. False when ``tenant`` has the most already (or the queue holds none)."""
        if not self._queued:
            return False
        longest = max(self._queues, key=lambda name: len(self._queues[name]))
        if len(self._queues[longest]) <= len(self._queues.get(tenant, ())) + 1:
            return False
        evicted = self._queues[longest].pop()
        self._forget(evicted)
        evicted.error = Rejected(
            "tenant_share", Overloaded(f"endpoint is at capacity; tenant {longest!r} holds most of its queue")
        )
        evicted.event.set()
        return True

    async def _wait_in_queue(self, deadline: float, tenant: str, weight: float) -> None:
        # Weighted fair queueing by request: each waiter's tag is one request's worth of virtual time
        # (1/weight) after the later of its tenant's previous waiter and the waiter served last.
        tag = max(self._finish.get(tenant, 0.0), self._virtual) + 1.0 / weight
        self._finish[tenant] = tag
        waiter = _Waiter(tenant, tag)
        self._queues.setdefault(tenant, deque()).append(waiter)
        self._queued += 1
        try:
            with trio.move_on_at(deadline):
                await waiter.event.wait()
        except BaseException:
            # Cancelled from outside (caller gone): leave the queue at once. The slot may have been
            # handed over after the cancellation was delivered but before we ran: pass it on.
            self._leave(waiter)
            if waiter.granted:
                self.release(tenant)
            raise
        self._leave(waiter)
        if waiter.granted:
            return
        if waiter.error is not None:
            raise waiter.error
        raise Rejected("deadline", DeadlineExceeded("deadline passed while queued for admission"))

    def _leave(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._forget(waiter)

    def _forget(self, waiter: _Waiter) -> None:
        """``waiter`` is out of its queue: drop an empty queue, and the tenant's tag once it is idle; a
        tenant's next tag follows its newest waiter still queued, so places given up (a deadline, a
        cancellation, a displacement) are no debt."""
        self._queued -= 1
        queue = self._queues.get(waiter.tenant)
        if queue:
            self._finish[waiter.tenant] = queue[-1].tag
        else:
            self._queues.pop(waiter.tenant, None)
            self._finish.pop(waiter.tenant, None)

    def _next_waiter(self) -> _Waiter | None:
        """The waiter to serve next: the smallest tag among the queues' heads whose tenant is below
        its limit."""
        best: _Waiter | None = None
        for tenant, queue in self._queues.items():
            head = queue[0]
            if (best is None or head.tag < best.tag) and self._below_limit(tenant):
                best = head
        return best

    def release(self, tenant: str = ANONYMOUS_TENANT) -> None:
        # Hand the slot straight to the next waiter so a newcomer cannot jump the queue.
        self._hold(tenant, -1)
        waiter = self._next_waiter() if self._queued else None
        if waiter is None:
            self._running -= 1
            return
        self._queues[waiter.tenant].popleft()
        self._forget(waiter)
        # Never backwards: under a tenant limit a waiter skipped for a while has an older tag.
        self._virtual = max(self._virtual, waiter.tag)
        self._hold(waiter.tenant, 1)
        waiter.granted = True
        waiter.event.set()

    def close(self) -> None:
        """Stop admitting: queued callers get SHUTTING_DOWN now, later callers at once."""
        self._closed = True
        error = Rejected("shutting_down", ShuttingDown("worker is shutting down", retryable=True))
        for queue in list(self._queues.values()):
            while queue:
                waiter = queue.popleft()
                self._forget(waiter)
                waiter.error = error
                waiter.event.set()
