"""The TCP client (egress side): many concurrent streams share one connection.

    async with TcpClient.connect(host, port) as client:
        async for chunk in client.stream("generate", {"max_tokens": 8}):
            ...
        result = await client.call("echo", {"x": 1})

With a version-4 worker the client sends a PING every ``heartbeat_interval`` seconds: a worker that does
not answer within ``heartbeat_timeout`` (its process hangs while its kernel still acknowledges TCP) fails
the connection's streams as UNAVAILABLE, and each PONG refreshes ``client.load``, the worker's load
report (its /status object). ``await client.ping()`` asks for a fresh one.

A remote error raises ``RemoteError`` with ``.code`` and ``.retryable``. The deadline sent to the worker
is the caller's own: the enclosing cancel scope's (``trio.current_effective_deadline()``) unless one is
given. Leaving a stream early (break, exception, cancellation, or dropping the iterator) sends KILL at
once, so the worker stops generating for nobody.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from runtime import BadRequest, ErrorCode, ExchangeEnded, IngressError, RemoteError, Unavailable, remote_error
from runtime._auth import AUTHORIZATION
from runtime._nursery import open_background_nursery

from .._keepalive import enable_keepalive
from .._writer import FrameWriter, WriterClosed
from . import _protocol as codec

RECEIVE_SIZE = 65536
# A worker that accepts but never says HELLO (its process hangs, or it is no trio-ingress worker) fails
# the connect after this long instead of holding the caller forever; the worker's own limit is the same.
HANDSHAKE_TIMEOUT = 10.0
# Chunks buffered per stream before the connection's reader waits for that stream's consumer.
STREAM_BUFFER = 256
# Version 4 heartbeat: a PING this often, and a worker that does not answer one within the timeout is
# considered hung. The timeout is generous: a worker's loop may be busy for a while without being hung.
HEARTBEAT_INTERVAL = 10.0
HEARTBEAT_TIMEOUT = 20.0
_END = object()


class TcpClient:
    """One connection to a worker. Build it with ``TcpClient.connect``."""

    def __init__(
        self,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        *,
        max_frame_size: int,
        write_high_water: int,
        version: int = codec.PROTOCOL_VERSION,
    ) -> None:
        self._stream = stream
        self._codec = codec.Connection(codec.Role.CLIENT, max_frame_size=max_frame_size, version=version)
        self._writer = FrameWriter(stream, write_high_water)
        self._ids = itertools.count(1)
        self._credential: dict[str, str] = {}
        self._streams: dict[int, trio.MemorySendChannel[Any]] = {}
        self._slots: trio.Semaphore | None = None
        self._lost: IngressError | None = None
        self._lost_event = trio.Event()
        self._goaway = trio.Event()
        self._idle: trio.Event | None = None  # made by wait_idle, set when the last stream ends
        # Exchanges waiting for credit to send their next message, and the most credit each has had
        # (its window: a message larger than that can never be sent), by stream id.
        self._credit_waiters: dict[int, trio.Event] = {}
        self._windows: dict[int, int] = {}
        # Version 4: PINGs waiting for their PONG, by opaque value; the latest load report.
        self._ping_ids = itertools.count()
        self._pings: dict[bytes, _PendingPing] = {}
        self.load: dict[str, Any] | None = None
        self.load_received_at: float | None = None
        # This client's streams when the report was made: the rest of its in_flight is other callers'.
        self.streams_at_report = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE,
        write_high_water: int = 256 * 1024,
        keepalive: float | None = 30.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        heartbeat_interval: float | None = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> AsyncIterator[TcpClient]:
        """Connect, handshake, and serve the connection for the duration of the block.

        ``token``: the credential every stream of this connection carries (``authorization: Bearer
        TOKEN`` in its metadata, docs/security.md), unless a stream's own ``authorization`` replaces it.

        ``tls``: speak TLS with this context (``runtime._tls.client_context(cafile, certfile,
        keyfile)`` trusts a CA and presents a client certificate); the worker's name is checked
        against ``host``. The TLS handshake counts against ``handshake_timeout``.

        A worker that closes the connection or stays silent instead of answering the HELLO (within
        ``handshake_timeout`` seconds) raises ``Unavailable``, retryable: nothing was sent.
        ``keepalive``: seconds of silence before the kernel probes the worker, so that a worker whose
        host vanished fails the open streams (UNAVAILABLE) within about twice this; None turns it off.
        ``heartbeat_interval`` / ``heartbeat_timeout``: see the module docstring (None: no heartbeat).
        A worker that speaks an older protocol version (it answers our HELLO with its own, lower one,
        and refuses ours) is reached again at its version: everything but exchanges works the same."""
        version = codec.PROTOCOL_VERSION
        heartbeat = None if heartbeat_interval is None else (heartbeat_interval, heartbeat_timeout)
        while True:
            try:
                async with cls._connected(
                    host,
                    port,
                    max_frame_size,
                    write_high_water,
                    keepalive,
                    handshake_timeout,
                    heartbeat,
                    tls,
                    version,
                ) as client:
                    if token is not None:
                        client._credential = {AUTHORIZATION: f"Bearer {token}"}
                    yield client
                    return
            except _OlderWorker as older:
                version = older.version

    @classmethod
    @asynccontextmanager
    async def _connected(
        cls,
        host: str,
        port: int,
        max_frame_size: int,
        write_high_water: int,
        keepalive: float | None,
        handshake_timeout: float,
        heartbeat: tuple[float, float] | None,
        tls: ssl.SSLContext | None,
        version: int,
    ) -> AsyncIterator[TcpClient]:
        try:
            raw = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise Unavailable(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}", retryable=True
            ) from exc
        if keepalive is not None:
            enable_keepalive(raw.socket, keepalive)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = raw
        if tls is not None:
            stream = trio.SSLStream(raw, tls, server_hostname=host)  # the handshake runs on first use
        client = cls(
            stream, max_frame_size=max_frame_size, write_high_water=write_high_water, version=version
        )
        try:
            async with open_background_nursery() as nursery:
                client._writer.start(nursery, lambda: client._connection_lost("connection reset"))
                try:
                    with trio.fail_after(handshake_timeout):
                        await client._handshake()
                except trio.BrokenResourceError as exc:
                    if isinstance(exc.__cause__, ssl.SSLError):
                        raise _tls_failed(host, port, exc.__cause__) from exc
                    raise Unavailable(
                        f"{host}:{port} closed the connection during the handshake: {exc}", retryable=True
                    ) from exc
                except (trio.ClosedResourceError, codec.RemoteProtocolError) as exc:
                    # Typically a worker that closed its listener with us still in the accept backlog,
                    # or that reached phase 3 of its drain before it read our HELLO.
                    raise Unavailable(
                        f"{host}:{port} closed the connection during the handshake: {exc}", retryable=True
                    ) from exc
                except trio.TooSlowError as exc:
                    raise Unavailable(
                        f"{host}:{port} did not answer the handshake within {handshake_timeout:g} s",
                        retryable=True,
                    ) from exc
                peer = client._codec.peer_hello
                if peer is not None and peer.version < version:
                    nursery.cancel_scope.cancel(reason="older worker")
                    raise _OlderWorker(peer.version)
                nursery.start_soon(client._read_loop)
                if heartbeat is not None and client._codec.version >= codec.HEARTBEAT_VERSION:
                    nursery.start_soon(client._heartbeat, *heartbeat)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel(reason="client closed")
        finally:
            # Whatever still waits on this connection (a stream, a PING) hears that it is over.
            client._connection_lost("the client closed the connection")
            client._writer.close()
            await trio.aclose_forcefully(stream)

    @property
    def max_streams(self) -> int:
        assert self._codec.peer_hello is not None
        return self._codec.peer_hello.max_streams

    async def wait_goaway(self) -> codec.GoAway:
        """Wait until the worker says it is draining; a router reconnects elsewhere for new streams."""
        await self._goaway.wait()
        assert self._codec.goaway_received is not None
        return self._codec.goaway_received

    async def ping(self) -> dict[str, Any] | None:
        """Send a PING and wait for its PONG (protocol version 4): returns the worker's load report (its
        /status object, docs/operations.md "Status"), None if it sent none. The caller bounds the wait
        (a cancel scope); a lost connection raises ``Unavailable``."""
        if self._codec.version < codec.HEARTBEAT_VERSION:
            raise BadRequest(
                f"this worker speaks TCP protocol version {self._codec.version}, which has no PING "
                "(load reports need version 4)"
            )
        self._raise_if_lost()
        opaque = next(self._ping_ids).to_bytes(codec.PING_OPAQUE_SIZE, "big")
        pending = self._pings[opaque] = _PendingPing()
        try:
            await self._writer.write(self._codec.send(codec.Ping(opaque)), flush=True)
            await pending.answered.wait()
        except WriterClosed:
            pass
        finally:
            self._pings.pop(opaque, None)
        self._raise_if_lost()
        return pending.report

    @property
    def usable(self) -> bool:
        """Whether new streams may open here: the connection is up and the worker is not draining."""
        return self._lost is None and self._codec.goaway_received is None

    @property
    def version(self) -> int:
        """The protocol version this connection speaks (the lower of the two sides')."""
        return self._codec.version

    @property
    def open_streams(self) -> int:
        """Streams (and exchanges) of this client that have not ended."""
        return len(self._streams)

    async def wait_lost(self) -> None:
        """Wait until the connection is lost (the worker closed it, reset it, or stopped answering)."""
        await self._lost_event.wait()

    async def wait_idle(self) -> None:
        """Wait until no stream of this client is open."""
        while self._streams:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def exchange(
        self,
        endpoint: str,
        *,
        deadline: float | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> ClientExchange:
        """A full-duplex exchange with a duplex endpoint (protocol version 2): ``await send(message)``,
        ``await end()`` (half-close), and iterate the answers, all at once, from different tasks if
        you like. Use it as an ``async with`` block: leaving early kills the exchange."""
        return ClientExchange(
            self, endpoint, b"", deadline, self._metadata(metadata), request_id or uuid.uuid4().hex
        )

    def stream(
        self,
        endpoint: str,
        request: Any = None,
        *,
        deadline: float | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> ClientStream:
        """Open a stream (lazily, on first iteration); ``deadline`` is in ``trio.current_time()`` terms."""
        payload = json.dumps(request, separators=(",", ":")).encode()
        return ClientStream(
            self, endpoint, payload, deadline, self._metadata(metadata), request_id or uuid.uuid4().hex
        )

    async def call(self, endpoint: str, request: Any = None, **options: Any) -> Any:
        """Call a unary endpoint and return its one answer."""
        async with self.stream(endpoint, request, **options) as stream:
            chunks = [chunk async for chunk in stream]
        if len(chunks) != 1:
            raise IngressError(
                f"endpoint {endpoint!r} sent {len(chunks)} chunks; use stream() for streaming endpoints"
            )
        return chunks[0]

    def _metadata(self, metadata: Mapping[str, str] | None) -> dict[str, str]:
        """A stream's metadata: the connection's credential (``token``), then the caller's own."""
        return {**self._credential, **(metadata or {})}

    # ---- connection internals -------------------------------------------------------------------------

    async def _handshake(self) -> None:
        """Up to the worker's HELLO. What came in the same read after it (a GOAWAY from a draining
        worker, say) stays in the codec for the read loop."""
        self._writer.write_nowait(self._codec.send(self._codec.local_hello))
        while True:
            event = self._codec.next_event()
            if event is codec.NEED_DATA:
                self._codec.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, codec.Hello):
                break
            elif isinstance(event, codec.Error):
                raise remote_error(event.code, event.message, retryable=event.retryable)
            elif isinstance(event, codec.ConnectionClosed):
                # An end of file read again and again would spin here for ever.
                raise trio.BrokenResourceError("the worker closed the connection before its HELLO")
        assert self._codec.peer_hello is not None
        self._slots = trio.Semaphore(self._codec.peer_hello.max_streams)

    async def _read_loop(self) -> None:
        try:
            # Frames that came with the HELLO first: a GOAWAY may be all the worker ever sends.
            while not await self._deliver_events():
                self._codec.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._connection_lost("connection reset by the worker")
        except codec.RemoteProtocolError as exc:
            self._connection_lost(f"protocol error from the worker: {exc}")

    async def _deliver_events(self) -> bool:
        while True:
            event = self._codec.next_event()
            if event is codec.NEED_DATA:
                return False
            if isinstance(event, codec.Data | codec.End | codec.Error) and event.stream_id:
                if not isinstance(event, codec.Data):
                    self._credit_granted(event.stream_id)  # a sender waiting for credit: it is over
                await self._deliver(event)
            elif isinstance(event, codec.WindowUpdate):
                stream_id = event.stream_id
                window = max(self._windows.get(stream_id, 0), self._codec.credit.get(stream_id, 0))
                self._windows[stream_id] = window
                self._credit_granted(stream_id)
            elif isinstance(event, codec.GoAway):
                self._goaway.set()
            elif isinstance(event, codec.Ping):
                self._writer.write_control(self._codec.send(codec.Pong(event.opaque)))
            elif isinstance(event, codec.Pong):
                self._pong_received(event)
            elif isinstance(event, codec.Error):
                self._connection_lost(f"worker closed the connection: {event.message}")
                return True
            elif isinstance(event, codec.ConnectionClosed):
                self._connection_lost("worker closed the connection")
                return True

    async def _deliver(self, event: codec.Data | codec.End | codec.Error) -> None:
        channel = self._streams.get(event.stream_id)
        if channel is None:
            return  # the consumer left (KILL sent); frames still in flight are dropped
        if isinstance(event, codec.Data):
            item: Any = event.payload
        elif isinstance(event, codec.End):
            item = _END
        else:
            item = remote_error(event.code, event.message, retryable=event.retryable)
        # The consumer may leave (closing its end, or ours: _close_stream) while we wait to send: what
        # was meant for it is dropped, and the connection goes on.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await channel.send(item)

    def _connection_lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = Unavailable(why)
        self._lost_event.set()
        for channel in self._streams.values():
            channel.close()
        for waiter in self._credit_waiters.values():
            waiter.set()
        for pending in self._pings.values():
            pending.answered.set()

    def _pong_received(self, pong: codec.Pong) -> None:
        report = _load_report(pong.report)
        if report is not None:
            self.load, self.load_received_at = report, trio.current_time()
            self.streams_at_report = len(self._streams)
        pending = self._pings.get(pong.opaque)
        if pending is not None:
            pending.report = report
            pending.answered.set()

    async def _heartbeat(self, interval: float, patience: float) -> None:
        """PING every ``interval``; a worker that does not answer within ``patience`` is hung: fail the
        connection (its streams end UNAVAILABLE) and close the socket so the reader stops too."""
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(patience):
                try:
                    await self.ping()
                except Unavailable:
                    return  # lost meanwhile: the reader has told the streams
                continue
            self._connection_lost(f"the worker did not answer a PING within {patience:g} s")
            self._writer.close()
            await trio.aclose_forcefully(self._stream)
            return

    def _credit_granted(self, stream_id: int) -> None:
        waiter = self._credit_waiters.pop(stream_id, None)
        if waiter is not None:
            waiter.set()

    # ---- used by ClientExchange -----------------------------------------------------------------------

    async def _send_message(self, stream_id: int, data: bytes) -> None:
        """Send one exchange message, waiting for the worker's credit (its flow control)."""
        while True:
            self._raise_if_lost()
            if stream_id in self._codec.client_ended:
                raise BadRequest("send() after end(): this exchange's input is closed")
            if stream_id not in self._codec.open_streams or stream_id not in self._streams:
                raise ExchangeEnded
            if self._codec.credit.get(stream_id, 0) >= len(data):
                break
            window = self._windows.get(stream_id, 0)
            if window and len(data) > window:
                raise BadRequest(
                    f"a message of {len(data)} bytes cannot fit this exchange's window of {window} "
                    "bytes (the endpoint's max_input_bytes)"
                )
            waiter = self._credit_waiters.get(stream_id)
            if waiter is None:  # shared by every sender of this exchange: one grant wakes them all
                waiter = self._credit_waiters[stream_id] = trio.Event()
            await waiter.wait()
        self._raise_if_lost()
        await self._writer.write(self._codec.send_data(stream_id, data))

    async def _end_input(self, stream_id: int) -> None:
        if stream_id in self._codec.client_ended:
            return  # ended already
        frame = self._codec.send(codec.End(stream_id))
        if frame:
            await self._writer.write(frame, flush=True)

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise Unavailable(self._lost.message, retryable=False)

    # ---- used by ClientStream -------------------------------------------------------------------------

    async def _open(self, stream: ClientStream) -> trio.MemoryReceiveChannel[Any]:
        assert self._slots is not None
        self._raise_if_unusable()
        await self._slots.acquire()
        try:
            self._raise_if_unusable()  # lost while we waited: nobody would ever close this stream
        except Unavailable:
            self._slots.release()
            raise
        stream_id = next(self._ids)
        # From version 3 the worker sends a stream no more than its answer credit: the reader never
        # waits for a consumer, so one stream left unread holds back no other. Before, the buffer
        # is bounded in chunks and a full one stops the reader (TCP back-pressure, for the connection).
        answer_credit = self._codec.version >= codec.ANSWER_CREDIT_VERSION
        send, receive = trio.open_memory_channel[Any](math.inf if answer_credit else STREAM_BUFFER)
        self._streams[stream_id] = send
        stream._stream_id = stream_id
        request = codec.Request(
            stream_id,
            stream.endpoint,
            stream.request_id,
            stream.timeout_ms(),
            tuple(stream.metadata.items()),
            stream.payload,
        )
        try:
            await self._writer.write(self._codec.send(request))
        except WriterClosed:
            self._close_stream(stream_id)
            self._raise_if_unusable()
        return receive

    def _raise_if_unusable(self) -> None:
        if self._lost is not None:
            raise Unavailable(self._lost.message, retryable=True)
        if self._codec.goaway_received is not None:
            raise Unavailable(f"worker is draining: {self._codec.goaway_received.message}", retryable=True)

    def _close_stream(self, stream_id: int, kill: bool = False) -> None:
        channel = self._streams.pop(stream_id, None)
        if channel is None:
            return
        self._credit_granted(stream_id)  # a sender waiting for credit learns the exchange is over
        channel.close()
        self._windows.pop(stream_id, None)
        if not self._streams and self._idle is not None:
            self._idle.set()
            self._idle = None
        assert self._slots is not None
        self._slots.release()
        if kill and not self._writer.closed:
            frame = self._codec.send(codec.Kill(stream_id))
            if frame:
                self._writer.write_nowait(frame)

    def _return_answer_credit(self, stream_id: int, size: int) -> None:
        """Version 3: the application took ``size`` bytes of this stream's answers; the worker may send
        that much more."""
        if stream_id in self._streams and not self._writer.closed:
            frame = self._codec.send(codec.WindowUpdate(stream_id, size))
            if frame:
                self._writer.write_nowait(frame)

    def _send_control(self, event: codec.Stop) -> None:
        if event.stream_id in self._streams and not self._writer.closed:
            frame = self._codec.send(event)
            if frame:
                self._writer.write_nowait(frame)

    def _lost_error(self, chunks: int) -> RemoteError:
        message = self._lost.message if self._lost else "connection lost"
        return remote_error(ErrorCode.UNAVAILABLE, message, retryable=chunks == 0)


class ClientStream:
    """The chunks of one request. Iterate it; ``stop()`` asks the worker to finish early."""

    def __init__(
        self,
        client: TcpClient,
        endpoint: str,
        payload: bytes,
        deadline: float | None,
        metadata: dict[str, str],
        request_id: str,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.payload = payload
        self.metadata = metadata
        self.request_id = request_id
        self._deadline = deadline
        self._stream_id = 0
        self._receive: trio.MemoryReceiveChannel[Any] | None = None
        self._opening: trio.Event | None = None  # set once the REQUEST went out (or failed to)
        self._chunks = 0
        self._finished = False
        self._taken = 0  # bytes of answers taken since answer credit was last returned (version 3)

    def timeout_ms(self) -> int:
        """The remaining budget to send: the explicit deadline, else the caller's cancel scope."""
        deadline = self._deadline if self._deadline is not None else trio.current_effective_deadline()
        if math.isinf(deadline):
            return 0
        return min(max(1, math.ceil((deadline - trio.current_time()) * 1000)), 0xFFFFFFFF)

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        try:
            receive = self._receive or await self._open_once()
            item = await receive.receive()
        except trio.EndOfChannel:
            self._finish(kill=False)
            raise self.client._lost_error(self._chunks) from None
        except BaseException:
            self._finish(kill=True)
            raise
        if isinstance(item, bytes):
            self._chunks += 1
            self._took(len(item))
            return json.loads(item)
        self._finish(kill=False)
        if item is _END:
            raise StopAsyncIteration
        raise item

    async def _open_once(self) -> trio.MemoryReceiveChannel[Any]:
        """Send the REQUEST, once, however many tasks get here first (an exchange's sender and reader)."""
        if self._opening is None:
            self._opening = trio.Event()
            try:
                self._receive = await self.client._open(self)
            finally:
                self._opening.set()
        else:
            await self._opening.wait()
        if self._receive is None:
            raise Unavailable("the request could not be sent", retryable=True)
        return self._receive

    def _took(self, size: int) -> None:
        """Return answer credit in halves of the window, not one WINDOW_UPDATE per chunk."""
        connection = self.client._codec
        if connection.version < codec.ANSWER_CREDIT_VERSION:
            return
        self._taken += size
        if self._taken * 2 >= connection.answer_window:
            self.client._return_answer_credit(self._stream_id, self._taken)
            self._taken = 0

    def stop(self) -> None:
        """Ask the worker to end this stream gracefully; the chunks already sent still arrive, then END."""
        if self._stream_id and not self._finished:
            self.client._send_control(codec.Stop(self._stream_id))

    async def aclose(self) -> None:
        """Stop reading: the worker is told to kill the request if it is still running."""
        self._finish(kill=True)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ClientStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _finish(self, *, kill: bool) -> None:
        if not self._finished:
            self._finished = True
            if self._stream_id:
                self.client._close_stream(self._stream_id, kill=kill)

    def __del__(self) -> None:
        # A plain `async for ... break` drops the iterator without closing it; CPython frees it at
        # once, so this is where the worker learns the caller left. write_nowait never blocks.
        if not self._finished and self._stream_id:
            # At interpreter shutdown or on a closed connection there is nobody left to tell.
            with contextlib.suppress(Exception):
                self._finish(kill=True)


def _load_report(raw: bytes) -> dict[str, Any] | None:
    """A worker's load report, or None if there is none or it is not one (a report we cannot read is no
    report: the fields a client acts on must have their documented types)."""
    if not raw:
        return None
    try:
        report = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(report, dict):
        return None
    in_flight, ready = report.get("in_flight", 0), report.get("ready", True)
    if type(in_flight) is not int or in_flight < 0 or not isinstance(ready, bool):
        return None
    return report


def _tls_failed(host: str, port: int, error: ssl.SSLError) -> Unavailable:
    """A TLS handshake that failed: a certificate not trusted, no client certificate where one is
    required. Not retryable: the same settings fail the same way; the message says what to check."""
    reason = getattr(error, "verify_message", None) or error.reason or str(error)
    return Unavailable(
        f"TLS handshake with {host}:{port} failed: {reason} (check the CA the client trusts, --cafile, and "
        "the worker's certificate; for mutual TLS, the client's --certfile/--keyfile)",
        retryable=False,
    )


class _PendingPing:
    __slots__ = ("answered", "report")

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.report: dict[str, Any] | None = None


class _OlderWorker(Exception):
    """The worker answered with an older protocol version (and refuses ours): connect again at it."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the worker speaks TCP protocol version {version}")
        self.version = version


class ClientExchange(ClientStream):
    """A full-duplex exchange: ``send`` messages and ``end`` the input while iterating the answers.

    ``send`` waits while the worker's credit for this exchange is used up (its handler is behind);
    a message larger than the exchange's whole window can never be sent and is a BadRequest. The
    answers arrive as with ``stream``; leaving the ``async with`` block early kills the exchange."""

    async def __aenter__(self) -> ClientExchange:
        return self

    async def _open_once(self) -> trio.MemoryReceiveChannel[Any]:
        if self.client._codec.version < codec.EXCHANGES_VERSION:
            raise BadRequest("this worker speaks TCP protocol version 1, which has no exchanges")
        return await super()._open_once()

    async def _ensure_open(self) -> int:
        await self._open_once()
        return self._stream_id

    async def send(self, message: Any) -> None:
        """Send one message (as JSON), waiting for credit."""
        await self.send_raw(json.dumps(message, separators=(",", ":")).encode())

    async def send_raw(self, data: bytes) -> None:
        """Send one message as it is: bytes the caller already encoded (one JSON document)."""
        stream_id = await self._ensure_open()
        await self.client._send_message(stream_id, data)

    async def end(self) -> None:
        """Half-close: no more messages; the answers go on until the worker ends the exchange."""
        stream_id = await self._ensure_open()
        await self.client._end_input(stream_id)
