"""The HTTP server the project owns: an accept loop and one task per connection, driving hypercorn's
sans-IO protocol layer (``H11Protocol``, ``H2Protocol``) through its event interface.

It lives in ``runtime/`` because both the HTTP transport and the ops listener (``--metrics``) serve
through it, and ``runtime/`` must not import a transport. hypercorn parses and frames; this module owns
everything that touches the socket and every bound (docs/http.md):

- **Backlog**: the listen queue is a setting (hypercorn's is 100: a burst of connections waited seconds
  in SYN retransmits).
- **One writer, no unbounded send**: hypercorn shields every ``send_all`` without a bound, so a peer
  that stops reading pins the worker forever after SIGTERM. Here what the protocol emits is queued
  (bounded: a sender waits while ``OUTGOING_HIGH_WATER`` is queued) and one writer task per connection
  sends it, unshielded: cancelling the connection (phase 3) ends it at once. A sender that is cancelled
  (its request killed) loses nothing and cuts nothing, since h2 has already counted the bytes as sent
  and they may carry other streams' frames; only the connection's end can cut a write.
- **h2 DATA for a stream already answered** (an app that replied before reading the whole body) is
  acknowledged and dropped; hypercorn raised KeyError there and lost the whole connection.
- **h2 back-pressure**: hypercorn's per-stream buffer lets a writer through whenever its sender pops
  nothing (a closed flow-control window pops zero bytes and "unpauses" the writer), so a client that does
  not read made the worker buffer without limit. ``_BoundedH2Protocol`` makes ``stream_send`` wait while
  the stream's queued bytes (or the connection's) are over their bound.
- **Closing without cutting a response**: a close the protocol asks for (after ``Connection: close``, a
  protocol error) half-closes the socket and keeps reading, discarding, for ``LINGER_TIMEOUT``. Closing
  with unread bytes would make the kernel send RST, which destroys a response the client has not read
  yet (RFC 9112 9.6).
- **Keep-alive**: a connection with nothing in progress is closed after ``keep_alive_timeout`` (counted
  from when it became idle, so a slowloris head does not reset it). Draining closes no HTTP/1.1
  connection by itself: a request arriving on an idle one is answered (503 + ``Connection: close`` by the
  app), so no request on the wire can meet a close; phase 3 cancels what is left.
- **GOAWAY at drain start (h2)**: once ``draining`` is set, every h2 connection gets one graceful GOAWAY
  and is closed: an idle one at once, a busy one when its last stream has ended (or at once with
  ``early_goaway``, its streams then running to their end), one opened during the drain once it has
  been answered. Streams past the GOAWAY's last stream id are refused. h2's own ``close_connection()``
  cannot do this: it moves h2's state machine to CLOSED, which fails every stream still running.
- **Containment**: any exception of one connection ends that connection only, logged.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import h2.errors
import h2.events
import structlog
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr
from hyperframe.frame import GoAwayFrame

from ._listeners import DEFAULT_BACKLOG, open_listeners, serve_accepting
from ._tls import certified_principal

# The hypercorn releases this loop was written and tested against (pyproject.toml pins the same range):
# it subclasses and drives hypercorn's protocol layer, which hypercorn may change in any release.
TESTED_HYPERCORN = ("0.18",)
# The key of a connection's client-certificate principal in each request's ASGI scope["state"].
CERTIFIED = "ingress.certified"
# Bytes asked of the kernel per read (hypercorn's MAX_RECV).
MAX_RECV = 64 * 1024
# Bytes queued for the socket beyond which a sender (a response, h2's sender) waits: with the socket's
# own buffer, what one connection holds for a peer that does not read.
OUTGOING_HIGH_WATER = 64 * 1024
# After the server closes its side, unread bytes from the peer are read and dropped for at most this long
# before the socket is closed (a close with unread bytes resets the connection and can destroy the
# response the peer is still reading).
LINGER_TIMEOUT = 2.0

# How long a closed h2 stream's app may take to make room for its ``http.disconnect`` (an app behind on
# its body reads it after what is queued; one that has already finished never does).
DISCONNECT_PATIENCE = 30.0

# The GOAWAY's debug data: for whoever reads a packet capture or a client's log.
GOAWAY_DEBUG_DATA = b"worker is draining; open new streams elsewhere"

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpServerLimits:
    """The bounds the connection loop applies itself (hypercorn's ``Config`` carries the parser limits)."""

    # Listen queue; the kernel caps it at net.core.somaxconn.
    backlog: int = DEFAULT_BACKLOG
    # Queued response bytes per h2 stream, and over all streams of one h2 connection, before the
    # writer waits (HTTP/1.1 has one response at a time: the socket itself is its bound).
    stream_high_water: int = 64 * 1024
    connection_high_water: int = 1024 * 1024
    # h2, at drain start: GOAWAY also the connections with streams still running, rather than when
    # their last stream ends. For clients that keep running streams after a GOAWAY (RFC 9113 6.8: Envoy,
    # Go, nghttp2, curl); a client built on the h2 library (httpx) fails them (python-hyper/h2#1181).
    early_goaway: bool = False


async def serve_http(
    app: ASGIApp,
    config: Config,
    limits: HttpServerLimits,
    host: str,
    port: int,
    *,
    prepare: Callable[[trio.SocketStream], None] | None = None,
    draining: trio.Event | None = None,
    listener_name: str = "http",
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; reports the bound (host, port).

    ``prepare`` is called with every accepted socket stream (say, to turn on TCP keepalive). Once
    ``draining`` is set (the worker's phase 1), every h2 connection is sent a graceful GOAWAY."""
    ssl_context = config.create_ssl_context()  # first: a bad certificate must not leak bound sockets
    sockets = await open_listeners(host, port, limits.backlog)
    listeners: list[trio.abc.Listener[Any]] = list(sockets)
    if ssl_context is not None:
        listeners = [trio.SSLListener(s, ssl_context, https_compatible=True) for s in sockets]
    wrapped = ASGIWrapper(app)  # type: ignore[arg-type]  # hypercorn's Framework union is narrower than ASGI's shape
    drain = _Drain(draining)
    handler = partial(_serve_connection, wrapped, config, limits, drain, prepare)
    try:
        async with trio.open_nursery() as nursery:
            if draining is not None:
                nursery.start_soon(drain.announce)
            task_status.started(sockets[0].socket.getsockname()[:2])
            await serve_accepting(
                handler,
                listeners,
                handler_nursery=nursery,
                logger=structlog.get_logger("ingress"),
                listener_name=listener_name,
            )
    finally:
        for listener in listeners:  # closed when the loop is cancelled (phase 3)
            await trio.aclose_forcefully(listener)


def effective_backlog(requested: int) -> int:
    """The listen queue the kernel will really give (it silently caps it at somaxconn)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return min(requested, int(f.read()))
    except (OSError, ValueError):
        return requested


class _Drain:
    """The listener's drain as its connections see it: the event, and the connections to tell when it
    is set (one task for all of them, rather than one parked task per connection)."""

    def __init__(self, started: trio.Event | None) -> None:
        self.started = started if started is not None else trio.Event()
        self.connections: set[Connection] = set()

    async def announce(self) -> None:
        await self.started.wait()
        for connection in self.connections:
            connection.drain_started()


async def _serve_connection(
    app: ASGIWrapper,
    config: Config,
    limits: HttpServerLimits,
    drain: _Drain,
    prepare: Callable[[trio.SocketStream], None] | None,
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
) -> None:
    try:
        if prepare is not None:
            prepare(stream.transport_stream if isinstance(stream, trio.SSLStream) else stream)
        await Connection(app, config, limits, stream, drain).run()
    except Exception as exc:  # one connection's failure, contained (Cancelled is not an Exception)
        structlog.get_logger("ingress").warning("http.connection_failed", exc_info=exc)
    finally:
        await trio.aclose_forcefully(stream)


class Connection:
    """One accepted connection: reads into the protocol, writes what it emits, closes it politely."""

    def __init__(
        self,
        app: ASGIWrapper,
        config: Config,
        limits: HttpServerLimits,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        drain: _Drain | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.limits = limits
        self.stream = stream
        self.context = WorkerContext(None)
        self.protocol: _ProtocolSwitch
        self._drain = drain if drain is not None else _Drain(None)
        self._task_group: TaskGroup | None = None  # the protocol's, while it runs
        # What the protocol sent and the writer task has not yet handed to the socket.
        self._outgoing = bytearray()
        self._has_outgoing = trio.Event()
        self._room = trio.lowlevel.ParkingLot()
        self._eof_wanted = False  # the protocol asked to close: FIN once the queue is out
        self._writing = False  # the writer task is inside send_all
        # For writes straight from the sender while the writer is idle (cleartext only: TLS frames).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._write_closed = False  # no more bytes go out (broken, or the writer has stopped)
        self._closing = False  # the protocol is told Closed; reads are only drained now
        self._told_closed = False
        # Protocol events in progress (the reader's data, re-entered by a send that breaks). Closed is
        # held back until none is, so the protocol never sees it between two events of one batch.
        self._handling = 0
        self._closed_pending = False
        self._idle_deadline = trio.current_time() + config.keep_alive_timeout
        self._linger_deadline = math.inf
        self._read_scope: trio.CancelScope | None = None

    async def run(self) -> None:
        alpn = await self._handshake()
        if alpn is None:
            return
        sock = self._socket()
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
        except OSError:
            return  # reset before we got to it (a health check, a port scan): nothing to serve or log
        async with trio.open_nursery() as writing:
            writing.start_soon(self._write_loop)
            async with TaskGroup() as task_group:
                # Under mutual TLS, who the client certificate names reaches each request's scope
                # ("state"), for the core's authentication (runtime/_intake.py).
                state = ConnectionState({CERTIFIED: certified_principal(self.stream)})
                args = (self.app, self.config, self.context, task_group, state, self._ssl, client, server)
                self.protocol = _ProtocolSwitch((*args, self.send), self.limits, alpn, self._drain.started)
                await self.protocol.initiate()
                self._task_group = task_group
                self._drain.connections.add(self)
                try:
                    await self._read()
                finally:
                    self._drain.connections.discard(self)
                    self._task_group = None
            # Every stream has ended and reading is over (peer closed, idle, or done lingering).
            writing.cancel_scope.cancel(reason="connection finished")

    def drain_started(self) -> None:
        """Phase 1: an h2 connection is told (in a task of its own: the announcer must not wait for one
        connection's back-pressure). HTTP/1.1 has nothing to send: see the module docstring."""
        protocol = self.protocol.protocol
        if isinstance(protocol, _BoundedH2Protocol) and self._task_group is not None:
            self._task_group.spawn(protocol.drain_started, self.limits.early_goaway)

    @property
    def _ssl(self) -> bool:
        return isinstance(self.stream, trio.SSLStream)

    def _socket(self) -> trio.socket.SocketType:
        if isinstance(self.stream, trio.SSLStream):
            inner = self.stream.transport_stream
            assert isinstance(inner, trio.SocketStream)
            return inner.socket
        return self.stream.socket

    async def _handshake(self) -> str | None:
        """The ALPN protocol to speak (http/1.1 in cleartext), or None if a TLS handshake failed."""
        if not isinstance(self.stream, trio.SSLStream):
            return "http/1.1"
        try:
            with trio.fail_after(self.config.ssl_handshake_timeout):
                await self.stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            return None
        return self.stream.selected_alpn_protocol() or "http/1.1"

    async def _read(self) -> None:
        while True:
            deadline = self._linger_deadline if self._closing else self._idle_deadline
            with trio.CancelScope(deadline=deadline) as scope:
                self._read_scope = scope
                data = await self._receive()
            self._read_scope = None
            if scope.cancelled_caught and not self._closing and self._still_writing():
                # "Idle" counts from when a response was queued, not written: a big body to a slow
                # reader is still going out, and closing now would cut it.
                self._set_idle(True)
                continue
            if scope.cancelled_caught or not data:
                break  # idle for keep_alive_timeout, done lingering, or the peer closed
            if not self._closing:  # once closing, what the peer still sends is dropped
                await self._handle(RawData(data))
        await self._tell_closed()

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(MAX_RECV))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def send(self, event: Event) -> None:
        """What the protocol calls (hypercorn's ``protocol_send``)."""
        if isinstance(event, RawData):
            await self._send_bytes(event.data)
        elif isinstance(event, Closed):
            await self._close_write()
            await self._tell_closed()
        elif isinstance(event, Updated):
            self._set_idle(event.idle)

    async def _send_bytes(self, data: bytes) -> None:
        """Queue ``data`` for the writer, then wait while too much is queued (back-pressure).

        Queued first, unconditionally: the protocol has already counted these bytes as sent (h2's
        ``data_to_send`` may hold frames of other streams too), so a sender cancelled here (its
        request killed, its client gone) must not take them back. Only the writer task touches the
        socket; a cancelled wait loses nothing."""
        if self._write_closed:
            return
        if not self._outgoing and not self._writing:
            # The writer is idle: hand the bytes to the kernel right here, without a task switch. A
            # non-blocking write cannot be cancelled half-way; whatever it does not take is queued.
            data = data[self._write_now(data) :]
            if not data:
                return
        self._outgoing += data
        self._has_outgoing.set()
        while len(self._outgoing) >= OUTGOING_HIGH_WATER and not self._write_closed:
            await self._room.park()

    def _write_now(self, data: bytes) -> int:
        """How much of ``data`` the kernel took without blocking (0 for TLS, a full or a broken socket:
        the writer task then sends it and finds out)."""
        if self._fd is None:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:
            return 0

    async def _write_loop(self) -> None:
        """The connection's one writer: what is queued goes out in order, then the FIN if the protocol
        asked to close. Only its own cancellation (the connection ending, phase 3) can cut a write."""
        try:
            while True:
                if not self._outgoing:
                    if self._eof_wanted:
                        await self._send_eof()
                        return
                    self._has_outgoing = trio.Event()
                    await self._has_outgoing.wait()
                    continue
                data, self._outgoing = self._outgoing, bytearray()
                self._room.unpark_all()
                self._writing = True
                await self.stream.send_all(data)
                self._writing = False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._stop_writing()
            await self._tell_closed()
        finally:
            self._stop_writing()

    async def _send_eof(self) -> None:
        # TLS has no half-close: the final close does it.
        if isinstance(self.stream, trio.SocketStream):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_eof()

    def _stop_writing(self) -> None:
        self._write_closed = True
        self._room.unpark_all()
        if self._closing:
            self._arm_linger()  # the FIN is out (or writing failed): now the linger may start

    def _still_writing(self) -> bool:
        return bool(self._outgoing) or self._writing

    async def _close_write(self) -> None:
        """Half-close (FIN after what is queued), then linger: see the module docstring. The linger
        starts once the FIN is out: a slow reader still gets the whole response; one that reads
        nothing at all keeps its connection until phase 3, like any response in progress."""
        self._eof_wanted = True
        self._has_outgoing.set()
        self._start_lingering()

    def _start_lingering(self) -> None:
        """From now on reads are only drained. The linger deadline waits for the writer when it still
        has the response and the FIN to send."""
        self._closing = True
        if not (self._eof_wanted and not self._write_closed):
            self._arm_linger()

    def _arm_linger(self) -> None:
        if self._linger_deadline == math.inf:
            self._linger_deadline = trio.current_time() + LINGER_TIMEOUT
            if self._read_scope is not None:
                self._read_scope.deadline = self._linger_deadline

    async def _tell_closed(self) -> None:
        """Tell the protocol (its streams get ``http.disconnect``) once; reads are only drained after."""
        self._start_lingering()
        self._closed_pending = True
        # Held back only for h2, whose events come in batches (see _handle). HTTP/1.1's reader can
        # sit inside an event for a whole response (a pipelined request waits for the one before):
        # holding Closed there would keep a gone client's handler running to its end.
        if self._handling == 0 or not isinstance(self.protocol.protocol, H2Protocol):
            await self._deliver_closed()

    async def _handle(self, event: Event) -> None:
        """Hand one event to the protocol. On h2, a Closed that arrives meanwhile (a send broke in
        another task, or in this one through the protocol's own flush) waits until the event is done: h2
        handles a whole batch of frames per event, and a Closed in the middle of it made the rest of
        the batch create streams on a closed connection, whose responses then waited forever for a
        send task that had stopped (the rapid-reset in-flight leak)."""
        self._handling += 1
        try:
            await self.protocol.handle(event)
        finally:
            self._handling -= 1
        if self._handling == 0 and self._closed_pending:
            await self._deliver_closed()

    async def _deliver_closed(self) -> None:
        if not self._told_closed:
            self._told_closed = True
            await self.protocol.handle(Closed())

    def _set_idle(self, idle: bool) -> None:
        self._idle_deadline = trio.current_time() + self.config.keep_alive_timeout if idle else math.inf
        if self._read_scope is not None and not self._closing:
            self._read_scope.deadline = self._idle_deadline


class _ProtocolSwitch:
    """hypercorn's ``ProtocolWrapper``: HTTP/1.1 or h2 by ALPN, switching to h2 on prior knowledge or
    an h2c Upgrade; built here so that h2 is the bounded subclass."""

    def __init__(
        self, args: tuple[Any, ...], limits: HttpServerLimits, alpn: str, draining: trio.Event
    ) -> None:
        self._args = args
        self._limits = limits
        self._draining = draining
        self.protocol: H11Protocol | H2Protocol = self._h2() if alpn == "h2" else H11Protocol(*args)

    def _h2(self) -> _BoundedH2Protocol:
        return _BoundedH2Protocol(*self._args, limits=self._limits, draining=self._draining)

    async def initiate(self) -> None:
        await self.protocol.initiate()

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:
            self.protocol = self._h2()
            await self.protocol.initiate()
            if error.data:
                await self.protocol.handle(RawData(data=error.data))
        except H2CProtocolRequiredError as error:
            self.protocol = self._h2()
            await self.protocol.initiate(error.headers, error.settings)
            if error.data:
                await self.protocol.handle(RawData(data=error.data))


# What a stream's body delivery task takes, in order.
_BodyEvent = h2.events.DataReceived | h2.events.StreamEnded


class _BoundedH2Protocol(H2Protocol):
    """hypercorn's h2 protocol with a working bound on queued response bytes and a graceful GOAWAY when
    the drain starts (see the module docstring)."""

    def __init__(self, *args: Any, limits: HttpServerLimits, draining: trio.Event) -> None:
        super().__init__(*args)
        self._limits = limits
        self._room = trio.lowlevel.ParkingLot()
        # Streams whose request body is being handed to their app, by stream id (_deliver_body).
        self._bodies: dict[int, _BodyDelivery] = {}
        self._draining = draining
        self._announced = False  # open when the drain started (drain_started)
        self._last_stream_id: int | None = None  # the GOAWAY's, once sent
        self._receiving = False  # a batch of received frames is being handled

    async def drain_started(self, busy_too: bool) -> None:
        """Phase 1: GOAWAY and close now if no stream is in progress, else once the last one has ended;
        with ``busy_too``, the GOAWAY goes out now in any case (see ``HttpServerLimits.early_goaway``)."""
        self._announced = True
        if busy_too and not self.closed:
            await self._send_goaway()
        await self._end_if_drained()

    async def _send_goaway(self) -> None:
        """One GOAWAY (NO_ERROR), its last stream id the highest the client has opened: every stream it
        opened before runs to its end (a new call among them gets the drain's 503), any later one is
        refused. Not 2^31-1 first (RFC 9113 6.8): a worker that is draining takes no new call whatever
        the id, so a wider first promise would save no stream, and h2-based clients fail every stream
        at or below the id they receive (docs/http.md, "Draining").

        Built here rather than by h2's ``close_connection()``, which moves h2's state machine to CLOSED:
        every stream still running would fail. Queued after what h2 has pending, in one write, so that
        frames leave whole and in the order they were made."""
        if self._last_stream_id is not None:
            return
        self._last_stream_id = self.connection.highest_inbound_stream_id
        frame = GoAwayFrame(
            0,
            last_stream_id=self._last_stream_id,
            error_code=h2.errors.ErrorCodes.NO_ERROR,
            additional_data=GOAWAY_DEBUG_DATA,
        )
        await self.send(RawData(self.connection.data_to_send() + frame.serialize()))

    def _idle(self) -> bool:
        """No stream in progress, none with response bytes still to send (its END_STREAM included), and
        no batch of frames half handled (it may still open streams the GOAWAY would let through)."""
        return not (self.streams or self.stream_buffers or self._receiving)

    async def _end_if_drained(self) -> None:
        """Once draining, a connection ends with its last stream: GOAWAY (if it has not had one yet),
        then close. One opened during the drain that never opened a stream is left alone: its first
        request is on its way, and refusing it would send the client round to open another
        connection, and another; it gets its 503 first."""
        if (
            self._draining.is_set()
            and not self.closed
            and self._idle()
            and (self._announced or self.connection.highest_inbound_stream_id)
        ):
            await self._send_goaway()
            await self.send(Closed())

    def _beyond_goaway(self, stream_id: int) -> bool:
        return self._last_stream_id is not None and stream_id > self._last_stream_id

    def queued(self, stream_id: int | None = None) -> int:
        """Response bytes waiting for the peer's window: on one stream, or on the whole connection."""
        if stream_id is not None:
            buffer = self.stream_buffers.get(stream_id)
            return 0 if buffer is None else len(buffer.buffer)
        return sum(len(buffer.buffer) for buffer in self.stream_buffers.values())

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Body | Data):
            await self._wait_for_room(event.stream_id)
        await super().stream_send(event)

    async def _wait_for_room(self, stream_id: int) -> None:
        limits = self._limits
        while (
            not self.closed
            and stream_id in self.stream_buffers
            and (
                self.queued(stream_id) >= limits.stream_high_water
                or self.queued() >= limits.connection_high_water
            )
        ):
            await self._room.park()

    async def _send_data(self, stream_id: int) -> None:
        await super()._send_data(stream_id)
        self._room.unpark_all()  # bytes left, or the stream is gone: writers re-check their bound
        await self._end_if_drained()  # its END_STREAM may have been the connection's last frame

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData):
            self._receiving = True
            try:
                await super().handle(event)
            finally:
                self._receiving = False
            await self._end_if_drained()  # the batch may have reset the last stream
            return
        await super().handle(event)
        if isinstance(event, Closed):
            # hypercorn stops its send task on Closed but leaves the stream buffers open, so a response
            # still being pushed or drained waited forever: its request never ended and stayed counted
            # in flight (the rapid-reset leak). Closing them lets every writer see the end.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()
            self._room.unpark_all()

    async def _close_stream(self, stream_id: int) -> None:
        """hypercorn's, except that telling the app (``http.disconnect``) never waits here: its queue may
        be full behind a body its handler has not taken, and this runs in the loop that reads the
        connection (a client's RST_STREAM) as often as in the app's own last send."""
        delivery = self._bodies.get(stream_id)
        if delivery is not None:
            delivery.scope.cancel()  # what it still holds is dropped and acknowledged
        stream = self.streams.get(stream_id)
        if stream is not None and not self._app_has_room(stream_id):
            del self.streams[stream_id]
            self.task_group.spawn(self._tell_closed, stream)
            await self.has_data.set()
        else:
            await super()._close_stream(stream_id)
        self._room.unpark_all()
        await self._end_if_drained()

    async def _tell_closed(self, stream: Any) -> None:
        """Hand a closed stream's ``http.disconnect`` to its app once its queue has room; bounded, since
        an app that has already finished never takes it."""
        with trio.move_on_after(DISCONNECT_PATIENCE):
            await stream.handle(StreamClosed(stream_id=stream.stream_id))

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        """hypercorn's, one event at a time, except for request bodies:

        - A stream's DATA and its end are handed to its app here while the app's queue has room (as
          hypercorn does), and by a task of that stream's own (``_deliver_body``) from the moment it has
          none, until it has caught up. hypercorn awaited the full queue right here, so an app that
          stopped reading one body (an exchange whose handler is behind) stopped this loop: the client's
          WINDOW_UPDATEs for the answers went unread, the handler waited to send, and the exchange
          deadlocked. Either way DATA is acknowledged (the client's flow-control credit) only once the
          app took it, so a body is held back by h2's own windows, not buffered.
        - DATA for a stream that is already gone is dropped: an app that answers before reading the
          whole body (a 503 while draining, a 413) ends its stream, and the body's late DATA frames made
          hypercorn raise KeyError and end the whole connection, cutting every other stream on it.
        - A stream opened past the GOAWAY's last stream id (sent before the client saw it) is refused
          with REFUSED_STREAM: nothing of it ran, so the client may send it again anywhere."""
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and self._beyond_goaway(event.stream_id):
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            elif isinstance(event, h2.events.DataReceived | h2.events.StreamEnded):
                if self._app_has_room(event.stream_id):
                    await super()._handle_events([event])
                else:
                    self._queue_body_event(event)
            else:
                await super()._handle_events([event])
        await self._flush()  # acknowledgements of dropped DATA, which nothing else would send

    def _app_has_room(self, stream_id: int) -> bool:
        """Whether hypercorn may hand this stream's next body event to its app inline, without waiting:
        nothing of its body is queued for its task, and the app's queue (a trio memory channel behind
        ``app_put``; TESTED_HYPERCORN) has room."""
        if stream_id in self._bodies or stream_id not in self.streams:
            return False
        channel = getattr(getattr(self.streams[stream_id], "app_put", None), "__self__", None)
        if not isinstance(channel, trio.MemorySendChannel):
            return False  # not what this was tested against: always the safe way
        statistics = channel.statistics()
        return bool(statistics.current_buffer_used < statistics.max_buffer_size)

    def _queue_body_event(self, event: _BodyEvent) -> None:
        stream_id = event.stream_id
        delivery = self._bodies.get(stream_id)
        if delivery is None:
            if stream_id not in self.streams:
                if isinstance(event, h2.events.DataReceived):
                    # Still counted against the connection's window: hand the space back.
                    self.connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
                return
            send, receive = trio.open_memory_channel[_BodyEvent](math.inf)
            delivery = self._bodies[stream_id] = _BodyDelivery(send, trio.CancelScope())
            self.task_group.spawn(self._deliver_body, stream_id, delivery, receive)
        # Unbounded in count, bounded in bytes: the client sends no more than the stream's window, and
        # nothing queued here has been acknowledged yet.
        delivery.events.send_nowait(event)

    async def _deliver_body(
        self, stream_id: int, delivery: _BodyDelivery, queued: trio.MemoryReceiveChannel[_BodyEvent]
    ) -> None:
        """Hand a stream's queued body events to its app in order, each DATA acknowledged once taken;
        once caught up, the stream is handled inline again. Cancelled when the stream closes (its app
        may be gone, and nothing would ever take what it waits to hand over)."""
        taking: list[_BodyEvent] = []
        with delivery.scope:
            while True:
                try:
                    event = queued.receive_nowait()
                except trio.WouldBlock:
                    break  # caught up: with no await since, nothing can slip in between
                taking = [event]
                stream = self.streams.get(stream_id)
                if stream is not None:
                    if isinstance(event, h2.events.StreamEnded):
                        await stream.handle(EndBody(stream_id=stream_id))
                    else:
                        await stream.handle(Body(stream_id=stream_id, data=event.data))
                taking = []
                if isinstance(event, h2.events.DataReceived):
                    self.connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    await self._flush()
        if self._bodies.get(stream_id) is delivery:
            del self._bodies[stream_id]
        # The stream closed first: what was still on its way to the app is dropped, and its window
        # space handed back (the connection's window is shared with every other stream).
        dropped = sum(
            event.flow_controlled_length
            for event in taking + _drain(queued)
            if isinstance(event, h2.events.DataReceived)
        )
        if dropped and not self.closed:
            self.connection.acknowledge_received_data(dropped, stream_id)
            await self._flush()


@dataclass(frozen=True, slots=True)
class _BodyDelivery:
    """A stream's body events waiting for its app, and the scope of the task that hands them over."""

    events: trio.MemorySendChannel[_BodyEvent]
    scope: trio.CancelScope


def _drain(channel: trio.MemoryReceiveChannel[_BodyEvent]) -> list[_BodyEvent]:
    """What a channel still holds, without waiting."""
    events = []
    while True:
        try:
            events.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return events


async def discard_body(receive: Any, limit: int) -> None:
    """Read and drop the rest of a request body (at most ``limit`` bytes; the caller bounds the time),
    for an app that answers without it (404, 405, a 503 while draining).

    hypercorn reuses an HTTP/1.1 connection only if the request was read to its end when the response
    finished; otherwise it closes the connection, and a client that is already sending its next
    request on it gets no response at all. A body past the bounds is left: that connection closes."""
    received = 0
    while received <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        received += len(message.get("body", b""))
