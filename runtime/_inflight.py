"""In-flight request tracking: one tracker per (endpoint, transport), summed by a global tracker.

Shutdown waits on these, so waiting for idle must never miss the zero crossing. The Rust original used a
``Notify`` and lost wake-ups when the last request finished between the waiter's check and its
registration. Here the check and the wait happen with no checkpoint in between (Trio runs one task at a
time and only switches at ``await``), and the idle ``Event`` is replaced only on the 0 -> 1 transition,
so a waiter always holds the event that the next 1 -> 0 transition will set.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InFlightStatistics:
    """A snapshot of one tracker: how many are running now and how many have ever started."""

    in_flight: int
    started: int
    finished: int


class _IdleCounter:
    """A count with an event that is set exactly while the count is zero."""

    def __init__(self) -> None:
        self._count = 0
        self._started = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def _increment(self) -> None:
        if self._count == 0:
            self._idle = trio.Event()
        self._count += 1
        self._started += 1

    def _decrement(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once the count is zero; returns at once (after a checkpoint) if it already is."""
        # A loop, not one wait: a new request may have started between the zero crossing and our turn.
        # Callers wait after intake is closed, when the count can only fall.
        while self._count:
            await self._idle.wait()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> InFlightStatistics:
        return InFlightStatistics(self._count, self._started, self._started - self._count)


class GlobalInFlight(_IdleCounter):
    """The sum over every endpoint tracker of a worker; phase 2 of shutdown waits on it."""


class EngineWork(_IdleCounter):
    """The engine calls and streams of a worker's handlers that are still running (runtime.engines),
    aborts included: the lifespan stops the engine only once this is zero (or after a bound)."""

    @contextmanager
    def track(self) -> Iterator[None]:
        self._increment()
        try:
            yield
        finally:
            self._decrement()


# The current worker's, for the handlers it runs (Worker.serve sets it; tasks inherit it).
current_engine_work: contextvars.ContextVar[EngineWork | None] = contextvars.ContextVar(
    "ingress_engine_work", default=None
)


class InFlight(_IdleCounter, Generic[T]):
    """Tracks the requests of one endpoint on one transport, and remembers them so they can be killed."""

    def __init__(self, parent: GlobalInFlight) -> None:
        super().__init__()
        self._parent = parent
        self._active: set[T] = set()

    def enter(self, item: T) -> None:
        """Count ``item`` as in flight (once; entering twice is a no-op)."""
        if item in self._active:
            return
        self._active.add(item)
        self._increment()
        self._parent._increment()

    def exit(self, item: T) -> None:
        """Stop counting ``item`` (a no-op if it is not counted)."""
        if item not in self._active:
            return
        self._active.discard(item)
        self._decrement()
        self._parent._decrement()

    def __contains__(self, item: T) -> bool:
        return item in self._active

    @contextmanager
    def track(self, item: T) -> Iterator[None]:
        """Count ``item`` as in flight for the duration of the block; the decrement is in a finally."""
        self.enter(item)
        try:
            yield
        finally:
            self.exit(item)

    def active(self) -> list[T]:
        """The items in flight now (a copy, safe to iterate while they finish)."""
        return list(self._active)
