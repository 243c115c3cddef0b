"""A connection's single writer: a byte-bounded buffer that coalesces frames into one ``send_all``.

Shared by the transports: TCP writes to the socket; HTTP writes to an ASGI ``send`` through a small adapter.

Every stream on a connection appends encoded frames here; one task writes them out. While that task is
in ``send_all``, frames pile up and go out together in the next write, so a busy connection makes few,
large writes (the throughput win) and an idle one sends each frame at once (the latency win). The task
runs only while something is queued: it is started in the connection's nursery when a frame is queued
and ends once the buffer is empty, so an idle connection (thousands are a normal load) holds no task.
Appending blocks while the buffer is over ``high_water``: a slow reader slows its own handlers, and the
worker's memory stays bounded at roughly ``high_water`` plus one frame per connection.

Only this task ever calls ``send_all``, so Trio's BusyResourceError ("another task is currently sending")
cannot happen here.

A frame skips the hop to the writer task when it can: if the writer is idle and nothing is queued, and
the frame is a request's last (``flush=True``) or the connection has been quiet for ``QUIET`` seconds
(a slow stream's next token, a new stream's first chunk), it is written at once with a non-blocking
``os.write``. That call cannot block or be cancelled half-way (so it never tears a frame), it cannot
overlap a ``send_all`` (the writer is idle), and whatever the kernel does not take is queued for the
writer as usual. This saves a task switch per frame where coalescing could not have helped; frames that
come in bursts (fast tokens) keep coalescing through the buffer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Protocol

import trio

from runtime import CallerGone

# A frame that comes this long after the connection's previous one is not part of a burst: written at
# once when the writer is idle (see above) instead of waiting for it to wake.
QUIET = 0.001


class ByteSink(Protocol):
    """What the writer writes to: a trio SendStream, or the HTTP transport's ASGI body adapter."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...


class WriterClosed(CallerGone):
    """The connection can no longer be written to (the peer is gone, or we are closing). A CallerGone,
    so that a sink that meets it anywhere (a chunk, an end, an error) ends its request as disconnected
    instead of as a handler failure."""


class FrameWriter:
    __slots__ = (
        "_buffer",
        "_closed",
        "_done",
        "_fd",
        "_finishing",
        "_high_water",
        "_last_write",
        "_nursery",
        "_on_broken",
        "_running",
        "_space",
        "_stream",
    )

    def __init__(self, stream: ByteSink, high_water: int) -> None:
        self._stream = stream
        self._high_water = high_water
        self._buffer = bytearray()
        # Writers waiting for room, and the event of the end: made when first needed (most connections
        # never need them, and each is a few hundred bytes).
        self._space: trio.lowlevel.ParkingLot | None = None
        self._done: trio.Event | None = None
        self._closed = False
        self._finishing = False
        # A writer task is alive: about to run, or inside send_all (so nothing may be written past it).
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._on_broken: Callable[[], None] = _nothing
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._last_write = -math.inf  # when write() was last called, in trio.current_time() terms

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def done(self) -> trio.Event:
        """Set once the writer has stopped: finished, closed, or the peer gone."""
        if self._done is None:
            self._done = trio.Event()
            if self._closed:
                self._done.set()
        return self._done

    async def write(self, data: bytes, *, flush: bool = False) -> None:
        """Queue ``data``, waiting while the peer is behind; raises WriterClosed if it never will be sent.

        ``flush`` marks a request's last frame: written at once if the writer is idle (see above), as is
        a frame after a quiet spell."""
        while len(self._buffer) >= self._high_water and not self._closed:
            if self._space is None:
                self._space = trio.lowlevel.ParkingLot()
            await self._space.park()
        now = trio.current_time()
        quiet, self._last_write = now - self._last_write >= QUIET, now
        if (flush or quiet) and not self._buffer and not self._running and not self._closed:
            data = data[self._write_now(data) :]
            if not data:
                return
        self.write_nowait(data)

    def _write_now(self, data: bytes) -> int:
        """How much of ``data`` the kernel took without blocking (0 if it took nothing or failed)."""
        if self._fd is None:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:
            # Full (EAGAIN) or broken: the writer task retries with send_all, which reports breakage.
            return 0

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data`` past the bound: only for small control frames that must not wait."""
        if self._closed:
            raise WriterClosed("connection closed")
        self._buffer += data
        if not self._running:
            self._spawn()

    def write_control(self, data: bytes) -> bool:
        """Queue a small answer that must not wait (a PONG), unless the connection is closed or twice
        the bound is already queued: then it is dropped (False), so a peer that asks without reading
        cannot grow our memory, and the reader never blocks on it."""
        if self._closed or len(self._buffer) >= 2 * self._high_water:
            return False
        self.write_nowait(data)
        return True

    def start(self, nursery: trio.Nursery, on_broken: Callable[[], None]) -> None:
        """Write in ``nursery`` (the connection's) from now on; ``on_broken`` is called (synchronously)
        if the peer stops accepting bytes. What was queued before goes out now."""
        self._nursery, self._on_broken = nursery, on_broken
        if self._buffer or self._finishing:
            self._spawn()

    def finish(self) -> None:
        """Write out what is queued, then stop (used to deliver a last error frame before closing)."""
        self._finishing = True
        if not self._running and not self._closed:
            self._spawn()

    def close(self) -> None:
        """No more writes (the connection is over): what is still queued is dropped, and writers
        waiting for room, or for ``done``, are released."""
        self._close()

    def _spawn(self) -> None:
        if self._nursery is None:
            return  # not started yet: start() spawns
        self._running = True
        try:
            self._nursery.start_soon(self._run)
        except RuntimeError:
            # The connection's nursery is closing (its tasks are being cancelled) or closed: what was
            # just queued can never be sent, as it could not while the old long-lived writer task was
            # being cancelled. Dropped without an error, since a task's cleanup may be what wrote it;
            # the next write raises WriterClosed.
            self._running = False
            self._close()

    async def _run(self) -> None:
        """The writer task: runs while something is queued."""
        try:
            while self._buffer:
                # Swap rather than copy: the old buffer is not touched again once handed to send_all.
                data, self._buffer = self._buffer, bytearray()
                if self._space is not None:
                    self._space.unpark_all()
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._close()
            self._on_broken()
            return
        except BaseException:  # cancelled: the connection is going away
            self._close()
            raise
        finally:
            self._running = False
        if self._finishing:
            self._close()

    def _close(self) -> None:
        self._closed = True
        if self._space is not None:
            self._space.unpark_all()
        if self._done is not None:
            self._done.set()


def _nothing() -> None:
    pass
