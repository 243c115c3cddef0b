"""The TCP ingress: one listener for every endpoint, many streams multiplexed on each connection.

Scopes: the transport nursery holds one task per connection; each connection's nursery holds its
writer and one task per stream (the request task, which runs the dispatcher). Closing or resetting a
connection kills every stream on it (counted as disconnects, by reason) before its nursery is
cancelled. Phase 1 of shutdown closes the listener (new connections are refused at once, which a client
can safely retry elsewhere), sends GOAWAY on open connections and answers any new stream with a
retryable UNAVAILABLE, while streams in flight run to the end; phase 3 closes the connections.

Heartbeat (protocol version 4): the worker answers every PING with a PONG carrying its load report, and
one task for the whole transport (not one per connection: idle connections are a normal load) pings a
version-4 client it has not heard from for a heartbeat interval, and closes the connection when the next
sweep has still heard nothing: a client whose process hangs while its kernel still acknowledges TCP
(which keepalive cannot see) has its streams killed and their capacity freed.
"""

from __future__ import annotations

import json
import math
import os
import ssl
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from runtime import (
    DEFAULT_BACKLOG,
    BadRequest,
    Call,
    Caller,
    Inbox,
    IngressError,
    InternalError,
    TransportBinding,
    open_listeners,
    refuse,
    serve_accepting,
)
from runtime._tls import certified_principal, server_context

from .._keepalive import enable_keepalive
from .._writer import FrameWriter, WriterClosed
from . import _protocol as codec

# One read takes what the kernel has, up to this much: large enough to take many frames per syscall.
RECEIVE_SIZE = 65536
# Error messages travel in a frame and may echo caller input: cap their UTF-8 size so an ERROR always
# fits the smallest frame limit a peer may announce (codec.MIN_MAX_FRAME_SIZE), whatever the text.
MAX_ERROR_MESSAGE_BYTES = 900
# How old a load report a PONG may carry (seconds): fresh enough for a router, cheap under a PING flood.
REPORT_MAX_AGE = 0.1


@dataclass(frozen=True, slots=True)
class TcpTransport:
    """Serve a worker's endpoints with the trio-ingress TCP protocol (docs/protocol-tcp.md)."""

    host: str = "127.0.0.1"
    port: int = 9000
    max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE
    max_streams_per_connection: int = codec.DEFAULT_MAX_STREAMS
    # Per-connection bound on queued outgoing bytes before handlers feel back-pressure.
    write_high_water: int = 256 * 1024
    # A connection that has not completed the handshake by then is closed (half-open or not ours).
    handshake_timeout: float = 10.0
    # After a protocol error: how long the connection's last ERROR frame may take to go out.
    close_timeout: float = 1.0
    # Seconds of silence before the kernel probes a client (see _keepalive.py): a client that vanished
    # without closing is noticed, and its handlers cancelled, within about twice this. None: off.
    keepalive: float | None = 30.0
    # Connections the kernel queues before they are accepted: a burst must not overflow into SYN
    # retransmits (runtime/_listeners.py).
    backlog: int = DEFAULT_BACKLOG
    # Version 4: a client silent for one interval is pinged; silent for the next one too, it is
    # considered hung and its connection closed (found within two to three intervals). None: off.
    heartbeat_interval: float | None = 15.0
    # TLS (docs/security.md): with both set, the port speaks TLS only (the handshake is bounded by
    # handshake_timeout); ``client_ca`` also requires a client certificate signed by that CA, whose
    # subject names the caller when no token does (mutual TLS).
    certfile: str | None = None
    keyfile: str | None = None
    client_ca: str | None = None
    name: str = "tcp"

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("TLS needs both certfile and keyfile (or neither, for cleartext)")
        if self.client_ca is not None and self.certfile is None:
            raise ValueError("client_ca (mutual TLS) needs certfile and keyfile too")

    async def serve(
        self,
        binding: TransportBinding,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; reports the bound (host, port)."""
        # First: a certificate that does not load must fail the start-up before any socket is bound.
        tls = None
        if self.certfile is not None and self.keyfile is not None:
            tls = server_context(self.certfile, self.keyfile, self.client_ca)
        listeners = await open_listeners(self.host, self.port, self.backlog)
        address = listeners[0].socket.getsockname()[:2]
        binding.runtime.logger.info(
            "tcp.listening",
            address=f"{address[0]}:{address[1]}",
            tls=tls is not None,
            mutual=bool(self.client_ca),
        )
        open_connections: set[_ServerConnection] = set()
        async with trio.open_nursery() as connections:
            task_status.started(address)
            with trio.CancelScope() as accept_scope:
                connections.start_soon(_close_intake, binding.intake_closed, accept_scope, open_connections)
                if self.heartbeat_interval is not None:
                    connections.start_soon(_sweep_heartbeats, self.heartbeat_interval, open_connections)
                await serve_accepting(
                    partial(self._serve_connection, binding, open_connections, _LoadReports(binding), tls),
                    listeners,
                    handler_nursery=connections,
                    logger=binding.runtime.logger,
                    listener_name="tcp",
                )
            # Intake closed (phase 1): refuse new connections now, keep the open ones until phase 3.
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _serve_connection(
        self,
        binding: TransportBinding,
        registry: set[_ServerConnection],
        reports: _LoadReports,
        tls: ssl.SSLContext | None,
        raw: trio.SocketStream,
    ) -> None:
        if self.keepalive is not None:
            enable_keepalive(raw.socket, self.keepalive)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = raw
        if tls is not None:
            stream = trio.SSLStream(raw, tls, server_side=True)  # the handshake runs on the first read
        connection = _ServerConnection(self, binding, stream, reports, _peer_name(raw))
        registry.add(connection)
        try:
            await connection.run()
        except Exception:
            # A bug on one connection must not take the worker down with it (serve_listeners would
            # propagate it): log it and close only this connection; its streams are already dropped.
            connection.log.exception("tcp.connection_failed")
        finally:
            registry.discard(connection)
            await trio.aclose_forcefully(stream)


async def _close_intake(
    event: trio.Event, accept_scope: trio.CancelScope, connections: set[_ServerConnection]
) -> None:
    """Phase 1 for the whole transport: stop accepting, and tell every open connection (one task for
    all of them, rather than one parked task per connection)."""
    await event.wait()
    accept_scope.cancel(reason="intake closed")
    for connection in connections:
        connection.announce_goaway()


class _LoadReports:
    """The worker's load report as a PONG carries it, encoded at most once per REPORT_MAX_AGE: a client
    that floods PINGs costs a frame each, not a status serialisation each."""

    def __init__(self, binding: TransportBinding) -> None:
        self._binding = binding
        self._encoded = b""
        self._at = -math.inf

    def encoded(self) -> bytes:
        status = self._binding.status
        if status is None:
            return b""
        now = trio.current_time()
        if now - self._at >= REPORT_MAX_AGE:
            self._encoded = json.dumps(status(), separators=(",", ":")).encode()
            self._at = now
        return self._encoded


async def _sweep_heartbeats(interval: float, connections: set[_ServerConnection]) -> None:
    """Every ``interval``: ping the version-4 clients not heard from since the last sweep, close those
    that did not answer the one before."""
    while True:
        await trio.sleep(interval)
        for connection in list(connections):
            connection.check_heartbeat()


class _ServerConnection:
    """One client connection: the reader runs in ``run``; writer and request tasks in its nursery."""

    # Thousands of idle connections are a normal load: no per-instance dict.
    __slots__ = (
        "_log",
        "answer_waiters",
        "binding",
        "caller",
        "codec",
        "heard",
        "peer",
        "ping_outstanding",
        "reports",
        "scope",
        "stream",
        "transport",
        "writer",
    )

    def __init__(
        self,
        transport: TcpTransport,
        binding: TransportBinding,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        reports: _LoadReports,
        peer: str,
    ) -> None:
        self.transport = transport
        self.reports = reports
        self.binding = binding
        self.stream = stream
        self.codec = codec.Connection(
            codec.Role.SERVER,
            max_frame_size=transport.max_frame_size,
            max_streams=transport.max_streams_per_connection,
        )
        self.writer = FrameWriter(stream, transport.write_high_water)
        self.peer = peer
        # The core's registry of this connection's open streams, keyed by stream id.
        self.caller = Caller(binding, peer=self.peer, max_calls=transport.max_streams_per_connection)
        self._log: Any = None  # bound on first use: most connections never log
        # Version 3: streams whose handler waits for the client to return answer credit.
        self.answer_waiters: dict[int, trio.Event] = {}
        self.scope: trio.CancelScope | None = None  # the connection nursery's, once it runs
        # Heartbeat: bytes arrived since the last sweep; a PING of ours is unanswered.
        self.heard = True
        self.ping_outstanding = False

    @property
    def log(self) -> Any:
        if self._log is None:
            self._log = self.binding.runtime.logger.bind(transport="tcp", peer=self.peer)
        return self._log

    async def run(self) -> None:
        # One coroutine frame fewer per connection than a run() around a _run(): idle connections
        # are a normal load, and each frame held while parked in receive_some is memory.
        try:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                self.writer.start(nursery, self._writer_broken)
                reason = await self._read_until_closed(nursery)
                self._drop_streams(reason)
                if reason == "protocol_error":
                    with trio.move_on_after(self.transport.close_timeout):
                        await self.writer.done.wait()
                nursery.cancel_scope.cancel(reason=f"connection {reason}")
        finally:
            self._drop_streams("closed")  # a no-op unless we are leaving through an error
            self.writer.close()  # its task (if any) ended with the nursery; nothing may be queued now

    async def _read_until_closed(self, nursery: trio.Nursery) -> str:
        """Serve frames until the peer leaves; returns why: closed, reset or protocol_error."""
        try:
            with trio.fail_after(self.transport.handshake_timeout):
                await self._handshake()  # TLS's first, if any: it runs inside the first read
            self.caller.certified = certified_principal(self.stream)
            # Exchanges stream their input only with a client that speaks version 2; an older one gives
            # an exchange all of its input in the REQUEST (NDJSON lines).
            self.caller.exchanges = self.codec.version >= codec.EXCHANGES_VERSION
            if self.binding.intake_closed.is_set():
                self.announce_goaway()  # accepted just before the listener closed
            # Frames that came in the same read as the HELLO are already buffered: act on them
            # before waiting for more bytes, which a client may never send.
            while not await self._handle_events(nursery):
                self.codec.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
                self.heard = True
            return "closed"
        except trio.TooSlowError:
            return self._protocol_error("handshake not completed in time")
        except codec.RemoteProtocolError as exc:
            return self._protocol_error(str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, WriterClosed):
            return "reset"

    async def _handshake(self) -> None:
        while True:
            event = self.codec.next_event()
            if isinstance(event, codec.Hello):
                await self.writer.write(self.codec.send(self.codec.local_hello))
                return
            if isinstance(event, codec.ConnectionClosed):
                raise trio.BrokenResourceError("closed before the handshake")
            self.codec.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    async def _handle_events(self, nursery: trio.Nursery) -> bool:
        """Act on every complete frame received so far; True once the peer has closed."""
        while True:
            event = self.codec.next_event()
            if event is codec.NEED_DATA:
                return False
            if isinstance(event, codec.Request):
                await self._open_stream(event, nursery)
            elif isinstance(event, codec.Data):
                self._exchange_message(event)
            elif isinstance(event, codec.End):
                self._exchange_end(event.stream_id)
            elif isinstance(event, codec.WindowUpdate):
                self._answer_credit_returned(event.stream_id)
            elif isinstance(event, codec.Kill | codec.Stop):
                self._signal_stream(event)
            elif isinstance(event, codec.Ping):
                self.writer.write_control(self._pong(event))
            elif isinstance(event, codec.Pong):
                self.ping_outstanding = False
            elif isinstance(event, codec.ConnectionClosed):
                return True
            elif isinstance(event, codec.Error):
                self.log.info("tcp.peer_error", code=event.code, message=event.message)
                return True

    async def _open_stream(self, request: codec.Request, nursery: trio.Nursery) -> None:
        stream_id = request.stream_id
        try:
            call = self.caller.open(
                stream_id, request.endpoint, request_id=request.request_id, metadata=dict(request.metadata)
            )
        except IngressError as error:
            await refuse(_StreamSink(self, stream_id), error)
            return
        if call.inbox is not None and self.caller.exchanges:
            # An exchange (protocol version 2): its first message rides on the REQUEST, the rest come
            # as DATA within the credit granted here and topped up as the handler takes them.
            if request.payload:
                call.inbox.offer(request.payload)
            call.inbox.on_consumed = partial(self._grant, stream_id, call.inbox)
            self._grant(stream_id, call.inbox)
        nursery.start_soon(self._run_stream, request, call)

    async def _run_stream(self, request: codec.Request, call: Call) -> None:
        timeout_ms = request.timeout_ms or None  # 0 on the wire means "no deadline"
        await call.run(request.payload, _StreamSink(self, request.stream_id), timeout_ms=timeout_ms)

    def _exchange_message(self, event: codec.Data) -> None:
        """A client's DATA on an exchange (the codec checked it against the credit granted)."""
        call = self.caller.get(event.stream_id)
        if call is None or call.inbox is None:
            # Not an exchange: no credit was ever granted, so the codec refused it already; or the
            # exchange just ended and its END is on the way: the message is dropped, as after it.
            return
        if not call.inbox.offer(event.payload):
            raise codec.RemoteProtocolError(f"flow control: stream {event.stream_id} sent past its window")

    def _exchange_end(self, stream_id: int) -> None:
        call = self.caller.get(stream_id)
        if call is not None and call.inbox is not None:
            call.inbox.end()

    def _grant(self, stream_id: int, inbox: Inbox, _consumed: int = 0) -> None:
        """Top the client's credit for DATA on ``stream_id`` up to the exchange's window: what waits in
        the inbox plus what the client may still send never exceeds ``inbox.limit`` (so the first
        message, which came with the REQUEST and used no credit, is accounted for too)."""
        if self.writer.closed or stream_id not in self.codec.open_streams:
            return
        room = inbox.limit - inbox.queued_bytes - self.codec.credit.get(stream_id, 0)
        if room <= 0:
            return
        frame = self.codec.send(codec.WindowUpdate(stream_id, min(room, 0xFFFFFFFF)))
        if frame:
            self.writer.write_nowait(frame)

    def _answer_credit_returned(self, stream_id: int) -> None:
        waiter = self.answer_waiters.pop(stream_id, None)
        if waiter is not None:
            waiter.set()

    async def wait_for_answer_credit(self, stream_id: int, size: int) -> None:
        """Version 3: wait until the client has room for ``size`` more bytes of this stream's answers
        (it reads them); the handler waits here, its siblings on the connection do not. A chunk past
        the client's frame limit does not wait: it can never be sent, and the sink says so."""
        hello = self.codec.peer_hello
        if hello is None or size > hello.max_frame_size:
            return
        while self.codec.answer_credit.get(stream_id, size) < size:
            waiter = self.answer_waiters[stream_id] = trio.Event()
            try:
                await waiter.wait()
            finally:  # also when the stream is killed meanwhile: nothing is left behind
                self.answer_waiters.pop(stream_id, None)

    def _signal_stream(self, event: codec.Stop | codec.Kill) -> None:
        # A stream that is not open finished already: its END crossed this frame on the wire.
        if isinstance(event, codec.Kill):
            self.caller.kill(event.stream_id)
        else:
            self.caller.stop(event.stream_id)

    def _pong(self, ping: codec.Ping) -> bytes:
        """The answer to a PING, with the worker's load report (the /status object) if it fits the
        client's frame limit (a worker with very many endpoints answers with none)."""
        report = self.reports.encoded()
        assert self.codec.peer_hello is not None
        if len(report) + codec.PING_OPAQUE_SIZE > self.codec.peer_hello.max_frame_size:
            report = b""
        return self.codec.send(codec.Pong(ping.opaque, report))

    def check_heartbeat(self) -> None:
        """One sweep of the heartbeat (see the module docstring)."""
        if self.heard:
            self.heard = False
            self.ping_outstanding = False
        elif self.codec.version < codec.HEARTBEAT_VERSION or self.writer.closed:
            return  # an older client cannot answer; TCP keepalive is all there is
        elif not self.ping_outstanding:
            self.ping_outstanding = True
            self.writer.write_nowait(self.codec.send(codec.Ping(os.urandom(codec.PING_OPAQUE_SIZE))))
        else:
            self.log.warning("tcp.heartbeat_timeout", message="the client did not answer a PING")
            self._abandon("heartbeat")

    def announce_goaway(self) -> None:
        if self.writer.closed or self.codec.peer_hello is None:
            return  # gone, or still in the handshake (it checks intake_closed when done)
        goaway = codec.GoAway(self.codec.highest_stream_id, "worker is draining; open new streams elsewhere")
        self.writer.write_nowait(self.codec.send(goaway))

    def _writer_broken(self) -> None:
        # Runs inside the writer task, before any stream can see the cancellation: counted as resets.
        self._abandon("reset")

    def _abandon(self, reason: str) -> None:
        """Kill the streams (counted under ``reason``) before anything sees the cancellation, then
        close the connection."""
        self._drop_streams(reason)
        if self.scope is not None:
            self.scope.cancel(reason=f"connection {reason}")

    def _drop_streams(self, reason: str) -> None:
        """The caller is gone: kill every stream of this connection and count it, once per stream."""
        self.caller.gone(reason)

    def _protocol_error(self, message: str) -> str:
        self.log.warning("tcp.protocol_error", message=message)
        self.binding.runtime.metrics.protocol_errors.labels("tcp").inc()
        error = codec.Error(0, BadRequest.code, False, _fit(f"protocol error: {message}"))
        if not self.writer.closed:  # in the handshake too: the peer learns why (docs/protocol-tcp.md)
            self.writer.write_nowait(self.codec.send_refusal(error))
        self.writer.finish()
        return "protocol_error"


class _StreamSink:
    """The dispatcher's view of one stream: JSON chunks as DATA frames, then END or ERROR."""

    __slots__ = ("conn", "stream_id")

    def __init__(self, conn: _ServerConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id

    async def send_chunk(self, data: bytes) -> None:
        if self.conn.codec.answer_credit.get(self.stream_id, len(data)) < len(data):
            await self.conn.wait_for_answer_credit(self.stream_id, len(data))
        await self._write(self._data_frame(data))

    def _data_frame(self, payload: bytes) -> bytes:
        try:
            return self.conn.codec.send_data(self.stream_id, payload)
        except codec.LocalProtocolError:
            raise InternalError(
                f"a chunk of {len(payload)} bytes exceeds the caller's frame limit "
                f"({self.conn.codec.peer_hello.max_frame_size if self.conn.codec.peer_hello else 0} bytes)"
            ) from None

    async def send_end(self, chunks: int) -> None:
        await self._write(self.conn.codec.send(codec.End(self.stream_id)), final=True)

    async def send_result(self, data: bytes) -> None:
        frames = self._data_frame(data) + self.conn.codec.send(codec.End(self.stream_id))
        await self._write(frames, final=True)

    async def send_error(self, error: IngressError, retryable: bool) -> None:
        await self._write(self.conn.codec.send(_error_event(self.stream_id, error, retryable)), final=True)

    async def _write(self, frame: bytes, final: bool = False) -> None:
        await self.conn.writer.write(frame, flush=final)  # WriterClosed is a CallerGone


def _error_event(stream_id: int, error: IngressError, retryable: bool) -> codec.Error:
    return codec.Error(stream_id, int(error.code), retryable, _fit(error.message))


def _fit(message: str) -> str:
    raw = message.encode()
    if len(raw) <= MAX_ERROR_MESSAGE_BYTES:
        return message
    return raw[: MAX_ERROR_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
