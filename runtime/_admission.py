"""Admission control for one endpoint: a concurrency limit with a bounded FIFO queue.

One ``Admission`` is shared by every transport serving the endpoint, because the limit protects the
handler's resources, not a socket. A caller that cannot start at once waits in the queue until its
deadline; a full queue rejects at once; a caller cancelled while queued leaves the queue at once; and
``close()`` (shutdown phase 1) turns every queued caller away with a retryable SHUTTING_DOWN, since none
of them has started any work.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ._errors import DeadlineExceeded, IngressError, Overloaded, ShuttingDown


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
    __slots__ = ("error", "event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False
        self.error: Rejected | None = None


class Admission:
    """``async with admission.slot(deadline):`` runs the block holding one of ``max_concurrency`` slots."""

    def __init__(self, max_concurrency: float = math.inf, max_queue: int = 0) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must not be negative")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._running = 0
        self._queue: OrderedDict[_Waiter, None] = OrderedDict()
        self._closed = False

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(self._running, len(self._queue), self.max_concurrency, self.max_queue)

    @asynccontextmanager
    async def slot(self, deadline: float = math.inf) -> AsyncIterator[None]:
        await self.acquire(deadline)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, deadline: float = math.inf) -> None:
        """Take a slot, queueing until ``deadline`` if none is free; pair with ``release()``."""
        if self._closed:
            raise Rejected("shutting_down", ShuttingDown("worker is shutting down", retryable=True))
        if self._running < self.max_concurrency and not self._queue:
            self._running += 1
            return
        if len(self._queue) >= self.max_queue:
            limit = f"{self.max_concurrency:g} running, {self.max_queue} queued"
            raise Rejected("overloaded", Overloaded(f"endpoint is at capacity ({limit})"))
        await self._wait_in_queue(deadline)

    async def _wait_in_queue(self, deadline: float) -> None:
        waiter = _Waiter()
        self._queue[waiter] = None
        try:
            with trio.move_on_at(deadline):
                await waiter.event.wait()
        except BaseException:
            # Cancelled from outside (caller gone): leave the queue at once. The slot may have been
            # handed over after the cancellation was delivered but before we ran: pass it on.
            self._queue.pop(waiter, None)
            if waiter.granted:
                self.release()
            raise
        self._queue.pop(waiter, None)
        if waiter.granted:
            return
        if waiter.error is not None:
            raise waiter.error
        raise Rejected("deadline", DeadlineExceeded("deadline passed while queued for admission"))

    def release(self) -> None:
        # Hand the slot straight to the oldest waiter so a newcomer cannot jump the queue.
        if self._queue:
            waiter, _ = self._queue.popitem(last=False)
            waiter.granted = True
            waiter.event.set()
        else:
            self._running -= 1

    def close(self) -> None:
        """Stop admitting: queued callers get SHUTTING_DOWN now, later callers at once."""
        self._closed = True
        error = Rejected("shutting_down", ShuttingDown("worker is shutting down", retryable=True))
        while self._queue:
            waiter, _ = self._queue.popitem(last=False)
            waiter.error = error
            waiter.event.set()
