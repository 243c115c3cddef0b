"""A connection's single writer: a byte-bounded buffer that coalesces frames into one ``send_all``.

Every stream on a connection appends encoded frames here; one task writes them out. While that task is
in ``send_all``, frames pile up and go out together in the next write, so a busy connection makes few,
large writes (the throughput win) and an idle one sends each frame at once (the latency win). Appending
blocks while the buffer is over ``high_water``: a slow reader slows its own handlers, and the worker's
memory stays bounded at roughly ``high_water`` plus one frame per connection.

Only this task ever calls ``send_all``, so Trio's BusyResourceError ("another task is currently sending")
cannot happen here.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class WriterClosed(Exception):
    """The connection can no longer be written to (the peer is gone, or we are closing)."""


class FrameWriter:
    def __init__(self, stream: trio.abc.SendStream, high_water: int) -> None:
        self._stream = stream
        self._high_water = high_water
        self._buffer = bytearray()
        self._wake = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        self._closed = False
        self._finishing = False
        self.done = trio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    async def write(self, data: bytes) -> None:
        """Queue ``data``, waiting while the peer is behind; raises WriterClosed if it never will be sent."""
        while len(self._buffer) >= self._high_water and not self._closed:
            await self._space.park()
        self.write_nowait(data)

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data`` past the bound: only for small control frames that must not wait."""
        if self._closed:
            raise WriterClosed("connection closed")
        self._buffer += data
        if not self._wake.is_set():
            self._wake.set()

    def finish(self) -> None:
        """Write out what is queued, then stop (used to deliver a last error frame before closing)."""
        self._finishing = True
        self._wake.set()

    async def run(self, on_broken: Callable[[], None]) -> None:
        """The writer task. Calls ``on_broken`` (synchronously) if the peer stops accepting bytes."""
        try:
            while True:
                if not self._buffer:
                    if self._finishing:
                        return
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                # Swap rather than copy: the old buffer is not touched again once handed to send_all.
                data, self._buffer = self._buffer, bytearray()
                self._space.unpark_all()
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._close()
            on_broken()
        finally:
            self._close()

    def _close(self) -> None:
        self._closed = True
        self._space.unpark_all()
        self.done.set()
