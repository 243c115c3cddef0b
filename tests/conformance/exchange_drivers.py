"""One ``ExchangeDriver`` per transport, all with the same small interface, so that each behaviour of the
exchange contract (test_exchange_contract.py) is written once for memory, TCP, HTTP/1.1, h2 and NATS.

    async with driver.open("chat") as exchange:        # an exchange on a connection of its own
        await exchange.send({"max_tokens": 2})        # waits where the transport holds a caller back
        answer = await exchange.next_answer()         # ExchangeOver(ending) once the answers ended
        await exchange.end()                          # the caller's half-close
        answers, ending = await exchange.finish()     # the answers still to come, and how they ended
        await exchange.stop() / .kill() / .disconnect()
    async with driver.connect() as connection:         # several exchanges on one connection
        async with connection.open("chat") as one, connection.open("chat") as two:
            ...

The callers are the project's own clients where there is one (``TcpClient.exchange``,
``NatsClient.exchange``, ``MemoryTransport.open``); for HTTP they are raw clients written from
docs/http.md as an outsider would write them: HTTP/1.1 with ``Transfer-Encoding: chunked`` (h11) and h2
(the ``h2`` library), each writing body lines while it reads the answers (NDJSON), with stop and kill
through the routes ``POST /v1/{endpoint}/{request_id}/stop|kill``. Every caller reads answers only when
asked (``next_answer``), with a bounded receive buffer of its own, so a test can play a caller that does
not read. ``send`` raises ``SendRefused`` where the transport refuses a message (the exchange is over);
where it drops it instead, ``send`` returns.

Where the transports differ, the docs say so, and a driver says which it is (class attributes):
``send_waits`` (the caller's send waits while the handler is a window behind: credit, or the inbox
itself; HTTP holds back by not reading the body, which the kernel's buffers hide from a small caller),
``hears_kill`` (the caller still hears CANCELLED after its kill: not where the client's kill is leaving
the exchange, TCP and NATS), ``concurrent`` (one connection carries several exchanges at once: not
HTTP/1.1) and ``answer_buffer`` (NATS only: answers are published as they come and the caller's inbox
keeps this many, then reports a gap; elsewhere a caller that does not read holds the handler back).

Each driver starts the contract's worker (app.py, ``build_exchange_worker``) in-process with
``open_worker`` on 127.0.0.1, port 0 (NATS: a real nats-server of its own).
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import httpx
import nats.errors
import trio

from runtime import IngressError, Unavailable, WorkerConfig, WorkerHandle, open_worker
from runtime.testing import MemoryCall, MemoryTransport, RecordingSink, nats_server
from transports.http import HttpTransport
from transports.nats import NatsClient, NatsTransport, RetryBudget
from transports.nats import _aio as nats_aio
from transports.tcp import TcpClient, TcpTransport

from .app import ExchangeProbe, build_exchange_worker
from .drivers import HTTP_RETRY_AFTER, HTTP_STATUS, NATS_CALLER_CHECK, SignalRefused

# Answers a memory caller takes in before it reads them: its receive buffer (a socket's, elsewhere).
MEMORY_BUFFER = 16
# How long a NATS exchange hears nothing from its worker before it reports the exchange lost.
NATS_STALL_TIMEOUT = 2.0
# docs/protocol-nats.md: the caller's inbox keeps this many replies, then loses some and says so.
NATS_ANSWER_BUFFER = 4096
NDJSON = "application/x-ndjson"


def compact(message: Any) -> bytes:
    """A message as every caller here sends it (the size of a message is what credit counts)."""
    return json.dumps(message, separators=(",", ":")).encode()


@dataclass
class Ending:
    """How an exchange's answers ended, as its caller learned it."""

    code: str | None = None  # the error's code name; None for a clean end
    retryable: bool | None = None
    message: str = ""
    status: int | None = None  # HTTP only: the response status
    cut: str | None = None  # neither a clean end nor an error (never allowed): why

    @property
    def ok(self) -> bool:
        return self.code is None and self.cut is None


class ExchangeOver(Exception):
    """``next_answer`` on an exchange whose answers have ended; ``ending`` says how."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(f"the exchange's answers ended: {ending}")
        self.ending = ending


class SendRefused(Exception):
    """The transport refused a message: the exchange is over for the caller."""


class Exchange:
    """One exchange as its caller sees it. A driver implements ``send_raw``, ``end``, ``_receive`` (the
    next answer, or the ``Ending``) and the signals."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.answers: list[Any] = []  # every answer read so far
        self.ending: Ending | None = None

    async def send(self, message: Any) -> None:
        await self.send_raw(compact(message))

    async def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    async def end(self) -> None:
        raise NotImplementedError

    async def next_answer(self) -> Any:
        if self.ending is None:
            item = await self._receive()
            if not isinstance(item, Ending):
                self.answers.append(item)
                return item
            self.ending = item
        raise ExchangeOver(self.ending)

    async def finish(self) -> tuple[list[Any], Ending]:
        """Read to the end: the answers not read yet, and how the exchange ended."""
        rest = []
        while True:
            try:
                rest.append(await self.next_answer())
            except ExchangeOver as over:
                return rest, over.ending

    async def _receive(self) -> Any:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError

    async def disconnect(self) -> None:
        raise NotImplementedError


class Connection:
    """What a caller holds open to a worker (a socket, a NATS connection; memory: the transport)."""

    def open(self, endpoint: str, *, request_id: str | None = None) -> AbstractAsyncContextManager[Any]:
        """An exchange with ``endpoint`` on this connection; leaving the block ends it if it is not over
        (the transport's kill, or the caller leaving)."""
        raise NotImplementedError


class ExchangeDriver:
    """The interface every transport's exchange driver implements (see the module docstring)."""

    name: ClassVar[str]  # the test id: memory, tcp, http1, h2, nats
    transport: ClassVar[str]  # the transport's name in metric labels
    send_waits: ClassVar[bool] = True
    hears_kill: ClassVar[bool] = True
    concurrent: ClassVar[bool] = True
    answer_buffer: ClassVar[int | None] = None
    # Every party of an exchange (worker, caller, the wire) runs in this process: when all of its tasks
    # are blocked, nothing is on its way (not so with a nats-server in between).
    in_process: ClassVar[bool] = True
    # The reason label of ingress_client_disconnects_total when ``disconnect`` is how an exchange ends.
    disconnect_reason: ClassVar[str] = "closed"

    def __init__(self, handle: WorkerHandle, probe: ExchangeProbe) -> None:
        self.handle = handle
        self.probe = probe

    def connect(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    @asynccontextmanager
    async def open(self, endpoint: str, *, request_id: str | None = None) -> AsyncIterator[Any]:
        """An exchange on a connection of its own (so that ``disconnect`` leaves nothing else)."""
        async with self.connect() as connection, connection.open(endpoint, request_id=request_id) as exchange:
            yield exchange

    async def idle(self, endpoint: str) -> None:
        """Wait until nothing is in flight on ``endpoint`` here: its outcome and metrics are in."""
        await self.handle.binding(self.transport, endpoint).tracker.wait_idle()


def _new_request_id() -> str:
    return f"xchg-{uuid.uuid4().hex[:12]}"


def _ending_of(error: IngressError, answers: int) -> Ending:
    return Ending(error.code.name, error.resolve_retryable(chunks_sent=answers), error.message)


async def _wait_any(*waits: Callable[[], Any]) -> None:
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Any]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


# ---- memory ---------------------------------------------------------------------------------------------


class _MemoryRoom:
    """Stands in for the RecordingSink's gate: a chunk passes only while the caller has fewer than
    MEMORY_BUFFER answers unread, so a memory caller that does not read holds its handler back, as a
    socket's buffer would."""

    def __init__(self, sink: RecordingSink) -> None:
        self.sink = sink
        self.read = 0
        self._room = trio.Event()

    async def wait(self) -> None:  # RecordingSink.send_chunk calls it before each chunk
        while len(self.sink.chunks) - self.read >= MEMORY_BUFFER:
            await self._room.wait()

    def took_one(self) -> None:
        self.read += 1
        self._room.set()
        self._room = trio.Event()


class _MemoryExchange(Exchange):
    def __init__(self, call: MemoryCall, request_id: str) -> None:
        super().__init__(request_id)
        self.call = call
        self.room = _MemoryRoom(call.sink)
        call.sink.gate = self.room  # type: ignore[assignment]  # duck-typed: the sink only awaits wait()

    async def send_raw(self, data: bytes) -> None:
        await self.call.send_raw(data)  # once the handler is done, dropped (docs/exchanges.md)

    async def end(self) -> None:
        self.call.end()
        await trio.lowlevel.checkpoint()

    async def _receive(self) -> Any:
        sink = self.call.sink
        while self.room.read >= len(sink.chunks):
            if self.call.done.is_set():
                return self._ending()
            sink.chunk_sent = trio.Event()  # the sink sets its current one after each chunk
            await _wait_any(sink.chunk_sent.wait, self.call.done.wait)
        chunk = sink.chunks[self.room.read]
        self.room.took_one()
        return chunk

    def _ending(self) -> Ending:
        sink = self.call.sink
        if sink.error is not None:
            return Ending(sink.error.code.name, sink.retryable, sink.error.message)
        if sink.ended:
            assert sink.end_count == len(sink.chunks), (sink.end_count, len(sink.chunks))
            return Ending()
        return Ending(cut="nothing was sent to end it (the caller was gone)")

    async def stop(self) -> None:
        self.call.stop()
        await trio.lowlevel.checkpoint()

    async def kill(self) -> None:
        self.call.kill()
        await trio.lowlevel.checkpoint()

    async def disconnect(self) -> None:
        self.call.disconnect("closed")
        await trio.lowlevel.checkpoint()


class _MemoryConnection(Connection):
    def __init__(self, memory: MemoryTransport) -> None:
        self.memory = memory

    @asynccontextmanager
    async def open(self, endpoint: str, *, request_id: str | None = None) -> AsyncIterator[Any]:
        request_id = request_id or _new_request_id()
        exchange = _MemoryExchange(self.memory.open(endpoint, b"", request_id=request_id), request_id)
        try:
            yield exchange
        finally:
            if not exchange.call.done.is_set():
                exchange.call.kill()


class MemoryExchangeDriver(ExchangeDriver):
    """``runtime.testing.MemoryTransport``: the core with no wire; its send waits in the inbox itself."""

    name = "memory"
    transport = "memory"

    def __init__(self, handle: WorkerHandle, probe: ExchangeProbe, memory: MemoryTransport) -> None:
        super().__init__(handle, probe)
        self.memory = memory

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: ExchangeProbe, config: WorkerConfig) -> AsyncIterator[MemoryExchangeDriver]:
        memory = MemoryTransport()
        async with open_worker(build_exchange_worker(probe), [memory], config) as handle:
            yield cls(handle, probe, memory)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        yield _MemoryConnection(self.memory)


# ---- TCP ------------------------------------------------------------------------------------------------


class _TcpExchange(Exchange):
    """``TcpClient.exchange``: send waits for credit; the client's kill is leaving the exchange."""

    def __init__(self, exchange: Any, client: TcpClient, request_id: str) -> None:
        super().__init__(request_id)
        self.exchange = exchange
        self.client = client
        self.left = False

    async def send_raw(self, data: bytes) -> None:
        try:
            await self.exchange.send_raw(data)
        except Unavailable as refused:  # the exchange has ended (or its connection)
            raise SendRefused(refused.message) from refused

    async def end(self) -> None:
        try:
            await self.exchange.end()
        except Unavailable as refused:
            raise SendRefused(refused.message) from refused

    async def _receive(self) -> Any:
        try:
            return await self.exchange.__anext__()
        except StopAsyncIteration:
            return Ending(cut="the caller left the exchange") if self.left else Ending()
        except IngressError as error:
            return _ending_of(error, len(self.answers))

    async def stop(self) -> None:
        self.exchange.stop()
        await trio.lowlevel.checkpoint()

    async def kill(self) -> None:
        self.left = True
        await self.exchange.aclose()  # KILL; the client forgets the stream, so CANCELLED goes unheard

    async def disconnect(self) -> None:
        # The client has no way to drop its connection but leaving its block; its socket closing under
        # it is what a caller that crashed looks like to the worker.
        await trio.aclose_forcefully(self.client._stream)


class _TcpConnection(Connection):
    def __init__(self, client: TcpClient) -> None:
        self.client = client

    @asynccontextmanager
    async def open(self, endpoint: str, *, request_id: str | None = None) -> AsyncIterator[Any]:
        request_id = request_id or _new_request_id()
        exchange = self.client.exchange(endpoint, deadline=math.inf, request_id=request_id)
        async with exchange:
            yield _TcpExchange(exchange, self.client, request_id)


class TcpExchangeDriver(ExchangeDriver):
    """``TcpClient`` (protocol version 2), one connection per ``connect``."""

    name = "tcp"
    transport = "tcp"
    hears_kill = False

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: ExchangeProbe, config: WorkerConfig) -> AsyncIterator[TcpExchangeDriver]:
        async with open_worker(build_exchange_worker(probe), [TcpTransport(port=0)], config) as handle:
            yield cls(handle, probe)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        async with TcpClient.connect(*self.handle.addresses["tcp"]) as client:
            yield _TcpConnection(client)


# ---- HTTP/1.1 and h2: raw clients ---------------------------------------------------------------------


class _HttpAnswers:
    """An exchange's answer as an HTTP caller reads it (docs/http.md): 200 with one JSON answer per
    NDJSON line, an error after answers as a last line ``{"error": {...}}``, the end of the body as the
    clean end; or, before any answer, an error status whose JSON body is the error (its status and
    Retry-After checked against the docs on the way)."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.values: deque[Any] = deque()
        self._buffer = bytearray()
        self._error: dict[str, Any] | None = None

    def start(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers
        if status == 200:
            assert headers.get("content-type") == NDJSON, headers

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self.status != 200:
            return  # an error body: read whole at the end
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        for line in lines:
            value = json.loads(line)
            assert self._error is None, f"an answer after the error line: {line!r}"
            if isinstance(value, dict) and set(value) == {"error"}:
                self._error = value["error"]
            else:
                self.values.append(value)

    def ending(self) -> Ending:
        """The body has ended: how the exchange did."""
        if self.status != 200:
            error = json.loads(self._buffer)["error"]
            assert self.status == HTTP_STATUS[error["code"]], (self.status, error)
            retry_after = HTTP_RETRY_AFTER if error["retryable"] else None
            assert self.headers.get("retry-after") == retry_after, (self.headers, error)
            return Ending(error["code"], error["retryable"], error["message"], self.status)
        if self._buffer:
            return Ending(status=200, cut=f"the body ended in the middle of a line: {bytes(self._buffer)!r}")
        if self._error is not None:
            error = self._error
            return Ending(error["code"], error["retryable"], error["message"], 200)
        return Ending(status=200)


def _request_headers(request_id: str) -> list[tuple[str, str]]:
    # The answers as NDJSON (docs/http.md, Formats); the body is NDJSON too: one message a line.
    return [("accept", NDJSON), ("content-type", NDJSON), ("x-request-id", request_id)]


def _path(endpoint: str, *signal: str) -> str:
    return "/" + "/".join(["v1", *(quote(part, safe="") for part in (endpoint, *signal))])


class _HttpExchange(Exchange):
    """What the HTTP/1.1 and h2 exchanges share: stop and kill through the routes, on another
    connection (docs/http.md: they may come on any)."""

    def __init__(self, request_id: str, endpoint: str, routes: httpx.AsyncClient) -> None:
        super().__init__(request_id)
        self.endpoint = endpoint
        self.routes = routes

    async def _signal(self, action: str) -> None:
        path = _path(self.endpoint, self.request_id, action)
        response = await self.routes.post(path)
        if response.status_code != 202:
            raise SignalRefused(f"POST {path} answered {response.status_code}: {response.text}")

    async def stop(self) -> None:
        await self._signal("stop")

    async def kill(self) -> None:
        await self._signal("kill")


class _H1Exchange(_HttpExchange):
    """One exchange on a raw HTTP/1.1 connection: the body chunked, one NDJSON line per chunk."""

    def __init__(self, connection: _H1Connection, endpoint: str, request_id: str) -> None:
        super().__init__(request_id, endpoint, connection.routes)
        self.connection = connection
        self.response = _HttpAnswers()

    async def start(self) -> None:
        headers = [("host", self.connection.authority), ("transfer-encoding", "chunked")]
        headers += _request_headers(self.request_id)
        request = h11.Request(method="POST", target=_path(self.endpoint), headers=headers)
        await self._write(request)

    async def _write(self, event: Any) -> None:
        try:
            await self.connection.stream.send_all(self.connection.h11.send(event) or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
            raise SendRefused(f"{type(exc).__name__}: {exc}") from exc

    async def send_raw(self, data: bytes) -> None:
        await self._write(h11.Data(data=data + b"\n"))

    async def end(self) -> None:
        await self._write(h11.EndOfMessage())

    async def _receive(self) -> Any:
        response = self.response
        while not response.values:
            try:
                event = await self.connection.next_event()
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return Ending(status=response.status, cut=f"{type(exc).__name__}: {exc}")
            if isinstance(event, h11.Response):
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                response.start(event.status_code, headers)
            elif isinstance(event, h11.Data):
                response.feed(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return response.ending()
            elif isinstance(event, h11.ConnectionClosed):
                return Ending(status=response.status, cut="the worker closed the connection")
        return response.values.popleft()

    async def disconnect(self) -> None:
        await self.connection.close()

    async def leave(self) -> None:
        """Leaving the block: a caller that has not had the whole answer goes away (closes the
        connection); one that has ends its body, so the connection can carry the next request."""
        h11_state = self.connection.h11
        if h11_state.their_state is not h11.DONE:
            await self.connection.close()
        elif h11_state.our_state is h11.SEND_BODY:
            try:
                await self.end()
            except SendRefused:
                await self.connection.close()


class _H1Connection(Connection):
    """A raw HTTP/1.1 connection (h11): one exchange at a time, the next one on the same connection
    once both sides are done with the last (keep-alive)."""

    def __init__(self, stream: trio.SocketStream, authority: str, routes: httpx.AsyncClient) -> None:
        self.stream = stream
        self.authority = authority
        self.routes = routes
        self.h11 = h11.Connection(h11.CLIENT)

    async def next_event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.stream.receive_some(65536))
        return event

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)

    @asynccontextmanager
    async def open(self, endpoint: str, *, request_id: str | None = None) -> AsyncIterator[Any]:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        if (self.h11.our_state, self.h11.their_state) != (h11.IDLE, h11.IDLE):
            states = f"client {self.h11.our_state}, worker {self.h11.their_state}"
            raise AssertionError(f"this HTTP/1.1 connection cannot carry another request ({states})")
        exchange = _H1Exchange(self, endpoint, request_id or _new_request_id())
        await exchange.start()
        try:
            yield exchange
        finally:
            await exchange.leave()


class _H2Exchange(_HttpExchange):
    """One h2 stream: the body's DATA within the worker's flow-control window (so ``send`` waits for
    WINDOW_UPDATE), the answers' DATA acknowledged (the stream's window reopened) only as they are
    read: a stream that is not read stops itself, not the connection."""

    def __init__(self, connection: _H2Connection, endpoint: str, request_id: str) -> None:
        super().__init__(request_id, endpoint, connection.routes)
        self.connection = connection
        self.h2 = connection.h2
        self.stream_id = 0
        self.response = _HttpAnswers()
        self.frames: deque[tuple[bytes, int]] = deque()  # DATA received, not read yet
        self.ended = False  # the worker ended the stream
        self.reset: str | None = None  # the stream (or the connection) went away: why
        self.changed = trio.Event()

    def start(self) -> None:
        self.stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", self.connection.authority),
            (":path", _path(self.endpoint)),
            *_request_headers(self.request_id),
        ]
        self.h2.send_headers(self.stream_id, headers)
        self.connection.kick()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def send_raw(self, data: bytes) -> None:
        payload = data + b"\n"
        while payload:
            if self.reset is not None:
                raise SendRefused(self.reset)
            try:
                window = self.h2.local_flow_control_window(self.stream_id)
                size = min(window, len(payload), self.h2.max_outbound_frame_size)
                if size:
                    self.h2.send_data(self.stream_id, payload[:size])
                    payload = payload[size:]
                    self.connection.kick()
                    continue
            except h2.exceptions.StreamClosedError as exc:
                raise SendRefused(f"the stream is closed: {exc!r}") from exc
            await _wait_any(self.connection.window_opened.wait, self.changed.wait)  # a WINDOW_UPDATE

    async def end(self) -> None:
        if self.reset is not None:
            raise SendRefused(self.reset)
        try:
            self.h2.end_stream(self.stream_id)
        except h2.exceptions.StreamClosedError as exc:
            raise SendRefused(f"the stream is closed: {exc!r}") from exc
        self.connection.kick()

    async def _receive(self) -> Any:
        response = self.response
        while not response.values:
            if self.frames:
                data, size = self.frames.popleft()
                self._acknowledge(size)
                response.feed(data)
            elif self.ended:
                return response.ending()
            elif self.reset is not None:
                return Ending(status=response.status, cut=self.reset)
            else:
                await self.changed.wait()
        return response.values.popleft()

    def _acknowledge(self, size: int) -> None:
        if size and not self.ended:
            try:
                self.h2.increment_flow_control_window(size, stream_id=self.stream_id)
            except h2.exceptions.StreamClosedError:
                return
            self.connection.kick()

    async def disconnect(self) -> None:
        await self.connection.close()

    async def leave(self) -> None:
        """Leaving the block: a stream not yet answered in full is reset (the caller went away); one
        that was has its body ended, as a finished caller's would be."""
        if self.reset is not None or self.connection.closed:
            return
        try:
            if not self.ended:
                self.h2.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
            else:
                self.h2.end_stream(self.stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self.connection.kick()


class _H2Connection(Connection):
    """A raw h2 connection (prior knowledge): one task reads and hands frames to the streams, one
    writes what the state machine has to send. The connection's window is reopened as DATA arrives
    (the client buffers it), a stream's only as its answers are read."""

    def __init__(self, stream: trio.SocketStream, authority: str, routes: httpx.AsyncClient) -> None:
        self.stream = stream
        self.authority = authority
        self.routes = routes
        config = h2.config.H2Configuration(client_side=True)
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, _H2Exchange] = {}
        self.window_opened = trio.Event()
        self.closed: str | None = None
        self._wanted = trio.Event()

    def kick(self) -> None:
        """There is something to send: the writer sends it."""
        self._wanted.set()

    async def write(self) -> None:
        try:
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                data = self.h2.data_to_send()
                if data:
                    await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lost(f"the connection broke: {exc!r}")

    async def read(self) -> None:
        try:
            while data := await self.stream.receive_some(65536):
                for event in self.h2.receive_data(data):
                    self._handle(event)
                self.kick()
            self._lost("the worker closed the connection")
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError) as exc:
            self._lost(f"the connection broke: {exc!r}")

    def _handle(self, event: Any) -> None:
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_opened.set()
            self.window_opened = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._lost(f"GOAWAY from the worker: {event.error_code!r}")
        exchange = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:  # the connection's window, at once
                self.h2.increment_flow_control_window(event.flow_controlled_length)
            if exchange is not None:
                exchange.frames.append((event.data, event.flow_controlled_length))
        if exchange is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            headers = {name.decode(): value.decode() for name, value in event.headers}
            exchange.response.start(int(headers[":status"]), headers)
        elif isinstance(event, h2.events.StreamEnded):
            exchange.ended = True
        elif isinstance(event, h2.events.StreamReset):
            exchange.reset = f"the worker reset the stream ({event.error_code!r})"
        exchange.notify()

    def _lost(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        for exchange in self.streams.values():
            if exchange.reset is None:
                exchange.reset = why
            exchange.notify()
        self.window_opened.set()

    async def close(self) -> None:
        self._lost("the caller closed the connection")
        await trio.aclose_forcefully(self.stream)

    @asynccontextmanager
    async def open(self, endpoint: str, *, request_id: str | None = None) -> AsyncIterator[Any]:
        exchange = _H2Exchange(self, endpoint, request_id or _new_request_id())
        if self.closed is not None:
            raise AssertionError(f"this h2 connection is gone: {self.closed}")
        exchange.start()
        self.streams[exchange.stream_id] = exchange
        try:
            yield exchange
        finally:
            await exchange.leave()


class HttpExchangeDriver(ExchangeDriver):
    """The raw HTTP clients above, one connection per ``connect``; the routes through httpx."""

    transport = "http"
    send_waits = False  # docs/exchanges.md: held back by not reading the body, behind kernel buffers

    def __init__(self, handle: WorkerHandle, probe: ExchangeProbe, routes: httpx.AsyncClient) -> None:
        super().__init__(handle, probe)
        self.routes = routes
        host, port = handle.addresses["http"]
        self.address = (host, port)
        self.authority = f"{host}:{port}"

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: ExchangeProbe, config: WorkerConfig) -> AsyncIterator[HttpExchangeDriver]:
        async with open_worker(build_exchange_worker(probe), [HttpTransport(port=0)], config) as handle:
            host, port = handle.addresses["http"]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=None) as routes:
                yield cls(handle, probe, routes)


class Http1ExchangeDriver(HttpExchangeDriver):
    name = "http1"
    concurrent = False

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        async with await trio.open_tcp_stream(*self.address) as stream:
            yield _H1Connection(stream, self.authority, self.routes)


class H2ExchangeDriver(HttpExchangeDriver):
    name = "h2"

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        async with await trio.open_tcp_stream(*self.address) as stream, trio.open_nursery() as nursery:
            connection = _H2Connection(stream, self.authority, self.routes)
            connection.h2.initiate_connection()
            connection.kick()
            nursery.start_soon(connection.write)
            nursery.start_soon(connection.read)
            try:
                yield connection
            finally:
                nursery.cancel_scope.cancel()


# ---- NATS -----------------------------------------------------------------------------------------------


class _NatsExchange(Exchange):
    """``NatsClient.exchange``: send waits for credit; the client's kill is leaving the exchange;
    ``disconnect`` closes the caller's NATS connection (the worker's probe finds its inbox gone)."""

    def __init__(self, exchange: Any, client: NatsClient, request_id: str, exits: AsyncExitStack) -> None:
        super().__init__(request_id)
        self.exchange = exchange
        self.client = client
        self.exits = exits
        self.left = False

    async def send_raw(self, data: bytes) -> None:
        try:
            await self.exchange.send_raw(data)
        except Unavailable as refused:
            raise SendRefused(refused.message) from refused

    async def end(self) -> None:
        await self.exchange.end()

    async def _receive(self) -> Any:
        try:
            return await self.exchange.__anext__()
        except StopAsyncIteration:
            return Ending(cut="the caller left the exchange") if self.left else Ending()
        except IngressError as error:
            return _ending_of(error, len(self.answers))

    async def stop(self) -> None:
        if not await self.exchange.stop():
            raise SignalRefused("NatsClient.stop: the exchange is not running")

    async def kill(self) -> None:
        self.left = True
        await self.exits.aclose()  # leaving the exchange's block sends KILL (docs/protocol-nats.md)

    async def disconnect(self) -> None:
        self.left = True
        await nats_aio.close(self.client._client)  # the caller's connection is gone; nobody says KILL
        # Leave the exchange's block now: its goodbye (KILL, unsubscribe) cannot go out any more.
        with contextlib.suppress(nats.errors.ConnectionClosedError):
            await self.exits.aclose()


class _NatsConnection(Connection):
    def __init__(self, client: NatsClient) -> None:
        self.client = client

    @asynccontextmanager
    async def open(self, endpoint: str, *, request_id: str | None = None) -> AsyncIterator[Any]:
        request_id = request_id or _new_request_id()
        async with AsyncExitStack() as exits:
            exchange = await exits.enter_async_context(
                self.client.exchange(endpoint, deadline=math.inf, request_id=request_id)
            )
            yield _NatsExchange(exchange, self.client, request_id, exits)


class NatsExchangeDriver(ExchangeDriver):
    """``NatsClient`` (no retries, a short stall timeout), one NATS connection per ``connect``."""

    name = "nats"
    transport = "nats"
    hears_kill = False
    answer_buffer = NATS_ANSWER_BUFFER
    in_process = False
    disconnect_reason = "gone"  # found by the worker's probe of the inbox (docs/protocol-nats.md)

    def __init__(self, handle: WorkerHandle, probe: ExchangeProbe, url: str) -> None:
        super().__init__(handle, probe)
        self.url = url

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: ExchangeProbe, config: WorkerConfig) -> AsyncIterator[NatsExchangeDriver]:
        async with nats_server() as url:
            transport = NatsTransport(url, caller_check_interval=NATS_CALLER_CHECK)
            async with open_worker(build_exchange_worker(probe), [transport], config) as handle:
                yield cls(handle, probe, url)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        budget = RetryBudget(ratio=0, reserve=0)
        async with NatsClient.connect(
            self.url, retry_budget=budget, stall_timeout=NATS_STALL_TIMEOUT
        ) as client:
            yield _NatsConnection(client)


# ---- the registry ---------------------------------------------------------------------------------------

EXCHANGE_DRIVERS: dict[str, type[Any]] = {
    "memory": MemoryExchangeDriver,
    "tcp": TcpExchangeDriver,
    "http1": Http1ExchangeDriver,
    "h2": H2ExchangeDriver,
    "nats": NatsExchangeDriver,
}


@asynccontextmanager
async def open_exchange_driver(name: str, probe: ExchangeProbe, config: WorkerConfig) -> AsyncIterator[Any]:
    """Start the exchange worker on transport ``name`` and yield its driver. On the way out, held
    handlers are released first, so nothing a test left held can keep the worker's drain waiting."""
    async with EXCHANGE_DRIVERS[name].start(probe, config) as driver:
        try:
            yield driver
        finally:
            probe.release.set()
            probe.reading.set()


async def run_exchange(
    driver_or_connection: Any, endpoint: str, messages: list[bytes]
) -> tuple[list[Any], Ending]:
    """One exchange: every message (raw bytes) sent, then the half-close, then every answer. A send the
    transport refuses (the exchange is over already) ends the sending; the answers say why."""
    async with driver_or_connection.open(endpoint) as exchange:
        try:
            for message in messages:
                await exchange.send_raw(message)
            await exchange.end()
        except SendRefused:
            pass
        answers, ending = await exchange.finish()
    return answers, ending
