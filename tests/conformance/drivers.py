"""One ``Driver`` per transport, all with the same async interface, so the contract tests are written once.

    reply = await driver.call(endpoint, payload, timeout_ms=None, request_id=None, metadata=None)
    async with driver.open(endpoint, payload, ...) as call:
        chunk = await call.next_chunk()       # StreamOver(reply) once the answer has ended
        await call.stop() / call.kill()       # the caller's stop and kill, in the transport's own form
        await call.disconnect()               # the caller goes away (connection closed, inbox dropped)
        reply = await call.finish()           # the whole answer

``payload`` is a JSON value, or ``bytes`` sent as they are (undecodable JSON, say). A ``Reply`` says what
the caller learned, in the transport-independent vocabulary: the chunks, a clean end, or an error code
name with its retryable flag. Where the wire form differs (HTTP statuses, SSE events, TCP frames, NATS
reply kinds), the driver maps it, and checks on the way that the wire form is the documented one (an
HTTP error's status is the one docs/http.md gives for its code, say).

Each driver starts the conformance worker in-process with ``open_worker`` on 127.0.0.1, port 0 (NATS: a
real nats-server of its own) and exposes its ``WorkerHandle`` as ``driver.handle``.

A new transport passes the suite by adding a driver here and its name to ``DRIVERS``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import trio

from runtime import ErrorCode, IngressError, WorkerConfig, WorkerHandle, open_worker
from runtime.testing import MemoryTransport, nats_server
from transports.http import HttpTransport
from transports.nats import NatsClient, NatsTransport, RetryBudget
from transports.tcp import TcpClient, TcpTransport
from transports.tcp import _protocol as codec

from .app import Probe, build_worker

# How often the NATS transport probes a running request's caller: a dropped inbox is noticed this fast.
NATS_CALLER_CHECK = 0.2
# How long a NATS caller waits without hearing anything before it reports the stream lost.
NATS_STALL_TIMEOUT = 10.0

# docs/http.md, "Status mapping" (CANCELLED: nginx's 499, transports/http/_app.py).
HTTP_STATUS = {
    "BAD_REQUEST": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "OVERLOADED": 429,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
    "SHUTTING_DOWN": 503,
    "INTERNAL": 500,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
}
# Seconds a client should wait before retrying a 429 or a 503 (docs/http.md, Headers and Draining).
HTTP_RETRY_AFTER = "1"


@dataclass
class Reply:
    """What a caller learned from one call."""

    chunks: list[Any] = field(default_factory=list)
    ended: bool = False  # a clean end (END frame, SSE end event, NATS end/result, memory sink.ended)
    code: str | None = None  # the error's code name; None when there was no error
    retryable: bool | None = None
    message: str | None = None
    status: int | None = None  # HTTP only: the response status
    cut: str | None = None  # the answer stopped with neither an end nor an error: why (never allowed)

    @property
    def ok(self) -> bool:
        return self.ended and self.code is None and self.cut is None


async def _collect(chunks: AsyncIterator[Any]) -> Reply:
    """A client's stream as a Reply: its chunks, then a clean end or the error it raised (a RemoteError,
    or the client's own, such as Unavailable after GOAWAY)."""
    reply = Reply()
    try:
        async for chunk in chunks:
            reply.chunks.append(chunk)
        reply.ended = True
    except IngressError as error:
        reply.code = error.code.name
        reply.retryable = error.resolve_retryable(chunks_sent=len(reply.chunks))
        reply.message = error.message
    return reply


class StreamOver(Exception):
    """``next_chunk`` on an answer that has ended; ``reply`` is the whole of it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"the answer ended: {reply}")
        self.reply = reply


class SignalRefused(AssertionError):
    """The transport would not take a stop or kill for a running request (HTTP: the route's 404)."""


class OpenCall:
    """A request in progress. A driver's reader task feeds it (``_chunk``, ``_end``, ``_error``,
    ``_cut``); the test reads it, and signals the request through the driver-specific subclass."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.reply = Reply()
        self.done = trio.Event()
        self._changed = trio.Event()
        self._read = 0

    async def next_chunk(self) -> Any:
        while self._read >= len(self.reply.chunks):
            if self.done.is_set():
                raise StreamOver(self.reply)
            await self._changed.wait()
        self._read += 1
        return self.reply.chunks[self._read - 1]

    async def finish(self) -> Reply:
        await self.done.wait()
        return self.reply

    async def stop(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError

    async def disconnect(self) -> None:
        raise NotImplementedError

    # ---- for the drivers' readers ----------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _chunk(self, value: Any) -> None:
        if not self.done.is_set():
            self.reply.chunks.append(value)
            self._notify()

    def _end(self) -> None:
        self._finish(ended=True)

    def _error(self, code: str, retryable: bool | None, message: str, status: int | None = None) -> None:
        self._finish(code=code, retryable=retryable, message=message, status=status)

    def _cut(self, why: str) -> None:
        self._finish(cut=why)

    def _finish(self, **what: Any) -> None:
        if self.done.is_set():
            return
        for name, value in what.items():
            setattr(self.reply, name, value)
        self.done.set()
        self._notify()


class Driver:
    """The interface every transport's driver implements (see the module docstring)."""

    name: ClassVar[str]  # the test id: memory, tcp, http1, h2, nats
    transport: ClassVar[str]  # the transport's name in metric labels and log lines
    # Whether the wire has a timeout that can be malformed (TCP's is a u32: every value is valid).
    has_timeout_text: ClassVar[bool] = True
    # The reason label of ingress_client_disconnects_total when ``disconnect`` is how a call ends.
    disconnect_reason: ClassVar[str] = "closed"
    # Whether another call can address a running request by id (HTTP's stop and kill routes: ``signal``).
    signal_routes: ClassVar[bool] = False

    def __init__(self, handle: WorkerHandle, probe: Probe) -> None:
        self.handle = handle
        self.probe = probe

    async def call(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> Reply:
        """One call, answered in full. ``timeout_text`` sends that text as the timeout field/header
        (only where the wire carries one as text: ``has_timeout_text``)."""
        async with self.open(
            endpoint,
            payload,
            timeout_ms=timeout_ms,
            request_id=request_id,
            metadata=metadata,
            timeout_text=timeout_text,
        ) as call:
            return await call.finish()

    def open(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> Any:  # an async context manager of OpenCall
        raise NotImplementedError

    async def idle(self, endpoint: str) -> None:
        """Wait until nothing is in flight on ``endpoint`` here: its outcome, metrics and log line are in."""
        await self.handle.binding(self.transport, endpoint).tracker.wait_idle()


def _body(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def _new_request_id() -> str:
    return f"conf-{uuid.uuid4().hex[:12]}"


async def _wait_any(*waits: Callable[[], Any]) -> None:
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Any]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


@asynccontextmanager
async def _reading(call: OpenCall, reader: Callable[[OpenCall], Any]) -> AsyncIterator[trio.CancelScope]:
    """Run ``reader(call)`` in the background for the block; yields its cancel scope (a disconnect
    cancels it). Leaving the block cancels it too."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def read() -> None:
            with scope:
                await reader(call)

        nursery.start_soon(read)
        try:
            yield scope
        finally:
            nursery.cancel_scope.cancel()


# ---- memory ---------------------------------------------------------------------------------------------


class _MemoryCall(OpenCall):
    def __init__(self, call: Any) -> None:
        super().__init__(call.ctx.id if call.ctx is not None else None)
        self.call = call

    async def stop(self) -> None:
        self.call.stop()
        await trio.lowlevel.checkpoint()

    async def kill(self) -> None:
        self.call.kill()
        await trio.lowlevel.checkpoint()

    async def disconnect(self) -> None:
        self.call.disconnect(reason="closed")
        await trio.lowlevel.checkpoint()


class MemoryDriver(Driver):
    """``runtime.testing.MemoryTransport.open``: the dispatcher with no wire at all."""

    name = "memory"
    transport = "memory"

    def __init__(self, handle: WorkerHandle, probe: Probe, memory: MemoryTransport) -> None:
        super().__init__(handle, probe)
        self.memory = memory

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: Probe, config: WorkerConfig) -> AsyncIterator[MemoryDriver]:
        memory = MemoryTransport()
        async with open_worker(build_worker(probe), [memory], config) as handle:
            yield cls(handle, probe, memory)

    @asynccontextmanager
    async def open(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> AsyncIterator[OpenCall]:
        memory_call = self.memory.open(
            endpoint,
            _body(payload),
            timeout_ms=timeout_text if timeout_text is not None else timeout_ms,
            request_id=request_id,
            metadata=metadata,
        )
        call = _MemoryCall(memory_call)
        async with _reading(call, self._follow):
            yield call

    async def _follow(self, call: OpenCall) -> None:
        memory_call = call.call
        sink = memory_call.sink
        done = trio.Event()
        async with trio.open_nursery() as nursery:

            async def wait_done() -> None:
                await memory_call.wait_done()
                done.set()

            nursery.start_soon(wait_done)
            delivered = 0
            while True:
                # RecordingSink sets its current chunk_sent on every chunk: a fresh one per wait.
                sink.chunk_sent = trio.Event()
                while delivered < len(sink.chunks):
                    call._chunk(sink.chunks[delivered])
                    delivered += 1
                if done.is_set():
                    break
                await _wait_any(sink.chunk_sent.wait, done.wait)
        if sink.error is not None:
            call._error(sink.error.code.name, sink.retryable, sink.error.message)
        elif sink.ended:
            assert sink.end_count == len(sink.chunks), (sink.end_count, sink.chunks)
            call._end()
        else:
            call._cut("the request ended with nothing sent (the caller was gone)")


# ---- TCP ------------------------------------------------------------------------------------------------


class _TcpCall(OpenCall):
    """One request on a raw connection of its own (stream 1), driven frame by frame with the codec."""

    STREAM = 1

    def __init__(self, request_id: str, stream: trio.SocketStream, conn: codec.Connection) -> None:
        super().__init__(request_id)
        self.stream = stream
        self.conn = conn
        self.reader: trio.CancelScope | None = None

    async def _send(self, event: codec.Stop | codec.Kill) -> None:
        frame = self.conn.send(event)
        if frame:  # b"" once the stream has ended: STOP/KILL and END cross on the wire
            await self.stream.send_all(frame)

    async def stop(self) -> None:
        await self._send(codec.Stop(self.STREAM))

    async def kill(self) -> None:
        await self._send(codec.Kill(self.STREAM))

    async def disconnect(self) -> None:
        assert self.reader is not None
        self.reader.cancel()
        await self.stream.aclose()

    async def read(self) -> None:
        try:
            while not self.done.is_set():
                event = self.conn.next_event()
                if event is codec.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, codec.Data):
                    self._chunk(json.loads(event.payload))
                elif isinstance(event, codec.End):
                    self._end()
                elif isinstance(event, codec.Error) and event.stream_id == self.STREAM:
                    self._error(ErrorCode(event.code).name, event.retryable, event.message)
                elif isinstance(event, codec.Error):
                    self._cut(f"connection error: {event.message}")
                elif isinstance(event, codec.ConnectionClosed):
                    self._cut("the worker closed the connection")
                # GOAWAY (draining) says nothing about stream 1, which runs to its end.
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._cut(f"connection lost: {exc!r}")


class TcpDriver(Driver):
    """``TcpClient`` for whole calls; the codec on a raw connection for open calls (the client hides the
    ERROR that follows its KILL) and for payloads that are not JSON."""

    name = "tcp"
    transport = "tcp"
    has_timeout_text = False

    def __init__(self, handle: WorkerHandle, probe: Probe, client: TcpClient) -> None:
        super().__init__(handle, probe)
        self.client = client
        self.address: tuple[str, int] = handle.addresses["tcp"]

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: Probe, config: WorkerConfig) -> AsyncIterator[TcpDriver]:
        async with (
            open_worker(build_worker(probe), [TcpTransport(port=0)], config) as handle,
            TcpClient.connect(*handle.addresses["tcp"]) as client,
        ):
            yield cls(handle, probe, client)

    async def call(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> Reply:
        assert timeout_text is None, "the TCP timeout is a u32"
        if isinstance(payload, bytes):  # the client encodes JSON itself
            return await super().call(
                endpoint, payload, timeout_ms=timeout_ms, request_id=request_id, metadata=metadata
            )
        # An explicit deadline: the client would otherwise send the test's own fail_after as one.
        deadline = math.inf if timeout_ms is None else trio.current_time() + timeout_ms / 1000
        stream = self.client.stream(
            endpoint, payload, deadline=deadline, metadata=metadata, request_id=request_id
        )
        async with stream:
            return await _collect(stream)

    @asynccontextmanager
    async def open(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> AsyncIterator[OpenCall]:
        assert timeout_text is None, "the TCP timeout is a u32"
        request_id = request_id or _new_request_id()
        async with await trio.open_tcp_stream(*self.address) as stream:
            conn = codec.Connection(codec.Role.CLIENT)
            await stream.send_all(conn.send(conn.local_hello))
            while conn.peer_hello is None:
                conn.receive_data(await stream.receive_some(65536))
                conn.next_event()
            request = codec.Request(
                _TcpCall.STREAM,
                endpoint,
                request_id,
                timeout_ms or 0,
                tuple((metadata or {}).items()),
                _body(payload),
            )
            await stream.send_all(conn.send(request))
            call = _TcpCall(request_id, stream, conn)
            async with _reading(call, _TcpCall.read) as reader:
                call.reader = reader
                yield call


# ---- HTTP/1.1 and h2 ------------------------------------------------------------------------------------


def _sse_events(buffer: bytearray) -> list[tuple[str, str]]:
    """Take the complete Server-Sent Events out of ``buffer``: (event name, data)."""
    events = []
    while (end := buffer.find(b"\n\n")) >= 0:
        block = bytes(buffer[:end]).decode()
        del buffer[: end + 2]
        name, data = "message", []
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


class _HttpCall(OpenCall):
    def __init__(self, request_id: str, driver: HttpDriver, endpoint: str) -> None:
        super().__init__(request_id)
        self.driver = driver
        self.endpoint = endpoint
        self.client: httpx.AsyncClient | None = None
        self.reader: trio.CancelScope | None = None

    async def _signal(self, action: str) -> None:
        # POST /v1/{endpoint}/{request_id}/{stop|kill}: 202 when a running request was signalled.
        path = f"/v1/{quote(self.endpoint, safe='')}/{quote(self.request_id or '', safe='')}/{action}"
        response = await self.driver.client.post(path)
        if response.status_code != 202:
            raise SignalRefused(f"POST {path} answered {response.status_code}: {response.text}")

    async def stop(self) -> None:
        await self._signal("stop")

    async def kill(self) -> None:
        await self._signal("kill")

    async def disconnect(self) -> None:
        # The call has a connection of its own: closing its client closes that connection.
        assert self.reader is not None and self.client is not None
        self.reader.cancel()
        await self.client.aclose()

    async def read(self, request: httpx.Request) -> None:
        assert self.client is not None
        try:
            response = await self.client.send(request, stream=True)
            assert response.http_version == ("HTTP/2" if self.driver.http2 else "HTTP/1.1")
            try:
                await self._read_response(response)
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            self._cut(f"{type(exc).__name__}: {exc}")

    async def _read_response(self, response: httpx.Response) -> None:
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            body = await response.aread()
            status, headers = response.status_code, response.headers
            if status == 200:
                assert content_type == "application/json", content_type
                self._chunk(json.loads(body))
                self._end()
                return
            error = json.loads(body)["error"]
            _check_error_status(status, headers, error)
            self._error(error["code"], error["retryable"], error["message"], status)
            return
        self.reply.status = 200
        buffer = bytearray()
        async for data in response.aiter_bytes():
            buffer += data
            for name, value in _sse_events(buffer):
                if name == "message":
                    self._chunk(json.loads(value))
                elif name == "end":
                    assert json.loads(value) == {"chunks": len(self.reply.chunks)}, value
                    self._end()
                elif name == "error":
                    error = json.loads(value)["error"]
                    self._error(error["code"], error["retryable"], error["message"], 200)
                else:
                    raise AssertionError(f"unknown SSE event {name!r}")
        self._cut("the response ended without an end or error event")


def _check_error_status(status: int, headers: httpx.Headers, error: dict[str, Any]) -> None:
    """The documented wire form of an error answered before any chunk (docs/http.md): its status, and
    Retry-After on (exactly) the retryable ones."""
    assert status == HTTP_STATUS[error["code"]], (status, error)
    assert headers.get("retry-after") == (HTTP_RETRY_AFTER if error["retryable"] else None), (headers, error)
    # RFC 9110 11.6.1: a 401 says how to authenticate (docs/security.md).
    assert (status == 401) == headers.get("www-authenticate", "").startswith("Bearer "), (status, headers)


class HttpDriver(Driver):
    """httpx over HTTP/1.1 or h2 (prior knowledge). Streams are read as SSE (the default format, with an
    explicit end event). Each open call gets a client (so a connection) of its own, which ``disconnect``
    closes; stop and kill go to the routes ``POST /v1/{endpoint}/{request_id}/{stop,kill}``."""

    transport = "http"
    http2: ClassVar[bool]
    signal_routes = True

    def __init__(self, handle: WorkerHandle, probe: Probe, client: httpx.AsyncClient) -> None:
        super().__init__(handle, probe)
        self.client = client
        host, port = handle.addresses["http"]
        self.base_url = f"http://{host}:{port}"

    async def signal(self, endpoint: str, request_id: str, action: str, headers: Mapping[str, str]) -> int:
        """POST /v1/{endpoint}/{request_id}/{action} with ``headers``, from a call of its own: the status."""
        path = f"/v1/{quote(endpoint, safe='')}/{quote(request_id, safe='')}/{action}"
        return (await self.client.post(path, headers=dict(headers))).status_code

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: Probe, config: WorkerConfig) -> AsyncIterator[HttpDriver]:
        async with open_worker(build_worker(probe), [HttpTransport(port=0)], config) as handle:
            host, port = handle.addresses["http"]
            async with cls._client(f"http://{host}:{port}") as client:
                yield cls(handle, probe, client)

    @classmethod
    def _client(cls, base_url: str) -> httpx.AsyncClient:
        # No httpx timeout: a held handler answers late on purpose; every test has its own bound.
        return httpx.AsyncClient(base_url=base_url, http1=not cls.http2, http2=cls.http2, timeout=None)

    def _request(
        self,
        client: httpx.AsyncClient,
        endpoint: str,
        payload: Any,
        request_id: str,
        timeout_ms: int | None,
        metadata: Mapping[str, str] | None,
        timeout_text: str | None,
    ) -> httpx.Request:
        headers = {"content-type": "application/json", "x-request-id": request_id, **(metadata or {})}
        if timeout_ms is not None:
            headers["x-request-timeout-ms"] = str(timeout_ms)
        if timeout_text is not None:
            headers["x-request-timeout-ms"] = timeout_text
        return client.build_request("POST", f"/v1/{endpoint}", content=_body(payload), headers=headers)

    @asynccontextmanager
    async def open(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> AsyncIterator[OpenCall]:
        request_id = request_id or _new_request_id()
        call = _HttpCall(request_id, self, endpoint)
        async with self._client(self.base_url) as client:
            call.client = client
            request = self._request(client, endpoint, payload, request_id, timeout_ms, metadata, timeout_text)
            async with _reading(call, lambda call: call.read(request)) as reader:
                call.reader = reader
                yield call


class Http1Driver(HttpDriver):
    name = "http1"
    http2 = False


class H2Driver(HttpDriver):
    name = "h2"
    http2 = True


# ---- NATS -----------------------------------------------------------------------------------------------


class _NatsCall(OpenCall):
    """One request through the raw nats-py connection of the driver's client: its own inbox, the
    project's reply reader (sequence and count checks), and STOP/KILL to the control subject."""

    def __init__(self, request_id: str, client: Any, inbox: str, subscription: Any) -> None:
        super().__init__(request_id)
        self.client = client
        self.inbox = inbox
        self.subscription = subscription
        self.state: Any = None
        self.reader: trio.CancelScope | None = None
        self.unsubscribed = False

    async def _signal(self, kind: str) -> None:
        from transports.nats import _aio as aio
        from transports.nats import _protocol as protocol

        if not self.state.control:
            raise SignalRefused("no reply yet: the first reply says where to send STOP/KILL")
        headers = {protocol.KIND: kind, protocol.TARGET: self.inbox}
        await aio.publish_batch(self.client, [aio.Outgoing(self.state.control, b"", headers)])

    async def stop(self) -> None:
        await self._signal("stop")

    async def kill(self) -> None:
        await self._signal("kill")

    async def disconnect(self) -> None:
        assert self.reader is not None
        self.reader.cancel()
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        from transports.nats import _aio as aio

        if not self.unsubscribed:
            self.unsubscribed = True
            await aio.unsubscribe(self.subscription)

    async def read(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        from runtime import RemoteError
        from transports.nats._client import _replies, _ReplyState

        self.state = _ReplyState()
        try:
            async for chunk in _replies(receive, NATS_STALL_TIMEOUT, self.state):
                self._chunk(chunk)
            self._end()
        except RemoteError as error:
            self._error(error.code.name, error.retryable, error.message)


class NatsDriver(Driver):
    """``NatsClient`` (with no retries: every call is one attempt) for whole calls; the same connection
    used raw for open calls (stop, kill, a dropped inbox) and for payloads or headers the client would
    not send. An unknown endpoint has no subscriber: NATS answers "no responders" itself."""

    name = "nats"
    transport = "nats"
    disconnect_reason = "gone"  # found by the worker's probe of the inbox (docs/protocol-nats.md)

    def __init__(self, handle: WorkerHandle, probe: Probe, client: NatsClient) -> None:
        super().__init__(handle, probe)
        self.client = client

    @classmethod
    @asynccontextmanager
    async def start(cls, probe: Probe, config: WorkerConfig) -> AsyncIterator[NatsDriver]:
        async with nats_server() as url:
            transport = NatsTransport(url, caller_check_interval=NATS_CALLER_CHECK)
            async with (
                open_worker(build_worker(probe), [transport], config) as handle,
                # A short stall timeout: a request sent while the subscription drains can go unanswered
                # (docs/protocol-nats.md, Shutdown); its caller must hear UNAVAILABLE before the drain ends.
                NatsClient.connect(
                    url, retry_budget=RetryBudget(ratio=0, reserve=0), stall_timeout=2
                ) as client,
            ):
                yield cls(handle, probe, client)

    async def call(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> Reply:
        if isinstance(payload, bytes) or timeout_text is not None:
            return await super().call(
                endpoint,
                payload,
                timeout_ms=timeout_ms,
                request_id=request_id,
                metadata=metadata,
                timeout_text=timeout_text,
            )
        deadline = math.inf if timeout_ms is None else trio.current_time() + timeout_ms / 1000
        stream = self.client.stream(
            endpoint, payload, deadline=deadline, metadata=metadata, request_id=request_id
        )
        async with aclosing(stream):
            return await _collect(stream)

    @asynccontextmanager
    async def open(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_text: str | None = None,
    ) -> AsyncIterator[OpenCall]:
        from transports.nats import _aio as aio
        from transports.nats import _protocol as protocol

        request_id = request_id or _new_request_id()
        nc = self.client._client
        send, receive = trio.open_memory_channel[Any](math.inf)
        inbox, subscription = await aio.subscribe_inbox(nc, send)
        call = _NatsCall(request_id, nc, inbox, subscription)
        try:
            headers = {protocol.REQUEST_ID: request_id}
            if timeout_ms is not None:  # both, as NatsClient sends them
                headers[protocol.TIMEOUT_MS] = str(timeout_ms)
                headers[protocol.DEADLINE] = f"{time.time() + timeout_ms / 1000:.3f}"
            if timeout_text is not None:
                headers[protocol.TIMEOUT_MS] = timeout_text
            headers.update({protocol.METADATA_PREFIX + k: v for k, v in (metadata or {}).items()})
            subject = protocol.subject(self.client.namespace, endpoint)
            await aio.publish_batch(nc, [aio.Outgoing(subject, _body(payload), headers, reply=inbox)])
            async with _reading(call, lambda call: call.read(receive)) as reader:
                call.reader = reader
                yield call
        finally:
            with trio.CancelScope(shield=True):
                await call.unsubscribe()


# ---- the registry -----------------------------------------------------------------------------------------

DRIVERS: dict[str, type[Any]] = {
    "memory": MemoryDriver,
    "tcp": TcpDriver,
    "http1": Http1Driver,
    "h2": H2Driver,
    "nats": NatsDriver,
}


@asynccontextmanager
async def open_driver(name: str, probe: Probe, config: WorkerConfig) -> AsyncIterator[Any]:
    """Start the conformance worker on transport ``name`` and yield its driver. On the way out, gated
    handlers are released first, so nothing a test left held can keep the worker's drain waiting."""
    async with DRIVERS[name].start(probe, config) as driver:
        try:
            yield driver
        finally:
            probe.release.set()


# ---- reading the accounting -------------------------------------------------------------------------------


def samples(handle: WorkerHandle, metric: str, transport: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The non-zero samples of ``metric`` for ``transport``, keyed by the values of ``labels`` (summed over
    the labels not named)."""
    found: dict[tuple[str, ...], float] = {}
    for family in handle.runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == metric and sample.labels.get("transport") == transport and sample.value:
                key = tuple(sample.labels[name] for name in labels)
                found[key] = found.get(key, 0.0) + sample.value
    return found


def request_lines(logs: list[dict[str, Any]], transport: str) -> Counter[str]:
    """The canonical ``request`` log lines of ``transport``, counted by outcome."""
    return Counter(
        line["outcome"] for line in logs if line["event"] == "request" and line.get("transport") == transport
    )
