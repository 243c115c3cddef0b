"""The inbound side of a full-duplex exchange: messages from the caller while responses stream out.

A transport hands each raw message of an open exchange to its ``Inbox`` and half-closes it with
``end()``; the handler iterates ``Messages``, which decodes each one at the core's one decoding boundary
(runtime/_payload.py: a bad message is BAD_REQUEST for the exchange) and ends when the caller
half-closed. The inbox is bounded in bytes: ``offer`` refuses what does not fit (a transport with credit
windows, TCP, never lets a caller send that much: refusing is a flow-control violation), and ``put``
waits for room (a transport whose back-pressure is to stop reading, HTTP). Once the handler is done,
what the caller still sends is discarded as it arrives, never buffered (on TCP the exchange's END then
closes the stream, and frames that cross it are dropped by the codec).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from ._errors import DeadlineExceeded, IngressError
from ._payload import decode_payload


class Inbox:
    """Raw inbound messages of one exchange, at most ``limit`` bytes of them waiting for the handler
    (one larger message is still taken when none waits, so no message size can deadlock)."""

    def __init__(self, limit: int, input_timeout: float | None = None) -> None:
        self.limit = limit
        self.input_timeout = input_timeout
        # Told how many bytes the handler took (or the inbox discarded): a transport with credit tops
        # the caller's up again (TCP's WINDOW_UPDATE).
        self.on_consumed: Callable[[int], None] | None = None
        self.received = 0  # messages the caller sent, over the exchange
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._ended = False  # the caller half-closed
        self._closed = False  # the handler is done: discard from now on
        self._failed: IngressError | None = None  # the input broke (a line too long): the handler hears it
        self._readable: trio.Event | None = None  # set while the handler waits for a message
        self._room: trio.Event | None = None  # set while a transport waits in put() for room

    # transport side

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def closed(self) -> bool:
        """The handler is done with its input: what still comes is discarded."""
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages waiting for the handler."""
        return self._queued_bytes

    def offer(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue ``data`` if it fits (or the handler is done: then it is dropped); False if it does not."""
        if self._ended:
            return True  # after a half-close nothing more is the caller's to send; the codec says so
        if self._closed:
            self._consumed(len(data))
            return True
        if self._queue and self._queued_bytes + len(data) > self.limit:
            return False
        self._queue.append(bytes(data))
        self._queued_bytes += len(data)
        self.received += 1
        self._wake_handler()
        return True

    async def put(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``, waiting while the handler is a whole ``limit`` behind."""
        while not self.offer(data):
            if self._room is None:  # shared by every sender waiting: one wake-up frees them all
                self._room = trio.Event()
            await self._room.wait()

    def fill(self, payload: bytes | bytearray | memoryview) -> None:
        """All of the input at once, for a transport that cannot stream it (a request body read whole):
        each non-empty line is one message (NDJSON), then the half-close."""
        for line in bytes(payload).split(b"\n"):
            if line.strip():
                self._queue.append(line)
                self._queued_bytes += len(line)
                self.received += 1
        self.end()

    def end(self) -> None:
        """The caller half-closed: once the queue is empty, the handler's iteration ends."""
        self._ended = True
        self._wake_handler()

    def fail(self, error: IngressError) -> None:
        """The input cannot go on (the transport found it malformed): the handler's next read raises
        ``error``, which ends the exchange with it."""
        self._failed = error
        self._ended = True
        self._wake_handler()

    # handler side

    async def next(self) -> bytes | None:
        """The next raw message, or None once the caller half-closed; DEADLINE_EXCEEDED when the caller
        sent nothing for ``input_timeout`` seconds."""
        deadline = math.inf if self.input_timeout is None else trio.current_time() + self.input_timeout
        while not self._queue:
            if self._failed is not None:
                raise self._failed
            if self._ended:
                return None
            self._readable = trio.Event()
            with trio.move_on_at(deadline):
                await self._readable.wait()
                continue
            raise DeadlineExceeded(f"the caller sent nothing for {self.input_timeout:g} s (input_timeout)")
        data = self._queue.popleft()
        self._queued_bytes -= len(data)
        self._consumed(len(data))
        if self._room is not None:
            room, self._room = self._room, None
            room.set()
        return data

    def close(self) -> None:
        """The handler is done (ended, failed or cancelled): drop what waits, and discard what comes."""
        self._closed = True
        dropped = sum(len(data) for data in self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        if dropped:
            self._consumed(dropped)
        if self._room is not None:
            self._room.set()

    def _consumed(self, size: int) -> None:
        if self.on_consumed is not None and size:
            self.on_consumed(size)

    def _wake_handler(self) -> None:
        if self._readable is not None:
            readable, self._readable = self._readable, None
            readable.set()


class Messages:
    """What a duplex handler iterates: the caller's messages, decoded, until it half-closes."""

    __slots__ = ("_inbox",)

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> Any:
        data = await self._inbox.next()
        if data is None:
            raise StopAsyncIteration
        return decode_payload(data)  # BadRequest for a message that is not JSON: the exchange ends
