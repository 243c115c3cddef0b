"""The ASGI application behind the HTTP transport.

Routes: ``POST /v1/{endpoint}`` (JSON body), ``POST /v1/{endpoint}/{request_id}/stop`` and ``/kill``
(for a running request, from any connection), ``GET /health``, ``GET /ready``, ``GET /metrics``. A unary
endpoint answers with JSON; a streaming one with Server-Sent Events (``data:`` lines of JSON, then an
``end`` event), or NDJSON when the request asks for ``application/x-ndjson``. Errors are
``{"error": {"code", "message", "retryable"}}`` with the natural status; after the first chunk an error
arrives in the stream (an ``error`` event), never as a silent cut.

hypercorn neither cancels the app when a client leaves nor fails ``send()`` afterwards, so every call
runs beside a watcher that waits for ``http.disconnect`` and kills the handler.
"""

from __future__ import annotations

import json
import math
from typing import Any

import trio

from runtime import (
    Admitted,
    BadRequest,
    Call,
    Caller,
    ErrorCode,
    IngressError,
    NotFound,
    TransportBinding,
    new_request_id,
    refuse,
)
from runtime._http_server import CERTIFIED, discard_body
from runtime._ops_server import OPS_PATHS, OpsApp

from .._writer import FrameWriter
from . import _protocol as protocol
from ._protocol import NDJSON, REQUEST_ID_HEADER, RETRY_AFTER, TIMEOUT_HEADER

Scope = dict[str, Any]
Receive = Any
Send = Any
Headers = list[tuple[bytes, bytes]]


class IngressApp:
    """One ASGI app serving every endpoint of a worker's HTTP binding."""

    def __init__(
        self,
        binding: TransportBinding,
        *,
        max_body_size: int,
        stream_high_water: int,
        body_timeout: float = math.inf,
    ) -> None:
        self.binding = binding
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.stream_high_water = stream_high_water
        self.ops = OpsApp(
            binding.readiness, binding.runtime.metrics.registry, binding.status, binding.runtime.config
        )
        # Every running call of the listener, for the stop and kill routes (which may come on another
        # connection); each call watches its own connection for the client leaving. An exchange's input
        # is its request body, streamed in as it arrives (NDJSON: one message a line).
        self.caller = Caller(binding, exchanges=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        route = protocol.parse_route(path, scope.get("raw_path"))
        if route is not None and method != "POST":
            await self._discard_body(receive)
            await _error(send, 405, BadRequest(f"use POST for {path}"), extra=[(b"allow", b"POST")])
        elif route is not None and route.signal is None:
            await self._call(scope, receive, send, route.endpoint)
        elif route is not None:
            await self._discard_body(receive)
            await self._signal(scope, send, route)
        elif path in OPS_PATHS:
            await self.ops(scope, receive, send)  # the same app as the --metrics listener
        else:
            error = NotFound(
                f"no route {method} {path}; endpoints are POST /v1/{{endpoint}} "
                "(and POST /v1/{endpoint}/{request_id}/stop or /kill)"
            )
            await self._discard_body(receive)
            await _error(send, 404, error)

    async def _call(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get(REQUEST_ID_HEADER) or new_request_id()
        id_header = [(REQUEST_ID_HEADER.encode(), request_id.encode("latin-1"))]
        http1 = _is_http1(scope)
        ndjson = NDJSON in headers.get("accept", "")
        sink = _HttpSink(send, ndjson, id_header, self.stream_high_water, http1=http1)
        try:
            # Refused before the body is read: a draining worker's 503 closes an HTTP/1.1 connection
            # without waiting for a body, and nothing counts in flight while a client uploads.
            admitted = self.caller.check(endpoint, headers, scope.get("state", {}).get(CERTIFIED))
        except IngressError as error:
            await self._refuse_unread(receive, sink, error, headers, http1)
            return
        if admitted.binding.endpoint.duplex:
            await self._exchange(scope, receive, sink, endpoint, request_id, admitted)
            return
        body_error: IngressError | None = None
        try:
            body = await self._read_body(receive)
        except _GoneBeforeBody:
            return  # nothing was started and nobody is left to answer
        except IngressError as error:  # too large, too slow: answered and counted like any other error
            body, body_error = bytearray(), error
        client = scope.get("client")
        try:
            call = self.caller.open(
                object(),  # every call is its own; the routes find it by request id
                endpoint,
                request_id=request_id,
                peer=f"{client[0]}:{client[1]}" if client else None,
                admitted=admitted,
            )
        except IngressError as error:  # the drain began while the body was arriving
            await refuse(sink, error)
            return
        if body_error is not None:
            await call.fail(body_error, sink)
            return
        await self._run(call, body, sink, receive)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        sink: _HttpSink,
        endpoint: str,
        request_id: str,
        admitted: Admitted,
    ) -> None:
        """A full-duplex exchange: the request body streams into the handler (NDJSON lines) while the
        answers stream out; the end of the body is the caller's half-close."""
        client = scope.get("client")
        try:
            call = self.caller.open(
                object(),
                endpoint,
                request_id=request_id,
                peer=f"{client[0]}:{client[1]}" if client else None,
                admitted=admitted,
            )
        except IngressError as error:  # the drain began since check()
            await self._refuse_unread(receive, sink, error, admitted.metadata, _is_http1(scope))
            return
        timeout_ms = call.ctx.metadata.get(TIMEOUT_HEADER)
        async with trio.open_nursery() as nursery:
            sink.nursery = nursery
            nursery.start_soon(self._feed_exchange, receive, call, sink)
            try:
                await call.run(b"", sink, timeout_ms=timeout_ms, timeout_name=TIMEOUT_HEADER)
            finally:
                nursery.cancel_scope.cancel(reason="exchange finished")

    async def _feed_exchange(self, receive: Receive, call: Call, sink: _HttpSink) -> None:
        """Hand each NDJSON line of the body to the exchange as it arrives, waiting while the handler is
        behind (hypercorn then stops taking the client's data); then watch for the client leaving."""
        inbox = call.inbox
        assert inbox is not None
        pending = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not sink.finished:
                    self.caller.drop(call.key, "closed")
                return
            if inbox.ended:
                continue  # the body is over (or broken): only a disconnect matters now
            *lines, pending = (pending + message.get("body", b"")).split(b"\n")
            for line in lines:
                if line.strip():
                    await inbox.put(line)
            if len(pending) > self.max_body_size:
                inbox.fail(
                    BadRequest(
                        f"an exchange message (one NDJSON line) is longer than {self.max_body_size} bytes"
                    )
                )
            elif not message.get("more_body", False):
                if pending.strip():
                    await inbox.put(pending)
                inbox.end()

    async def _run(self, call: Call, body: bytearray, sink: _HttpSink, receive: Receive) -> None:
        timeout_ms = call.ctx.metadata.get(TIMEOUT_HEADER)
        async with trio.open_nursery() as nursery:
            sink.nursery = nursery
            nursery.start_soon(self._watch_disconnect, receive, call, sink)
            try:
                await call.run(body, sink, timeout_ms=timeout_ms, timeout_name=TIMEOUT_HEADER)
            finally:
                nursery.cancel_scope.cancel(reason="request finished")

    async def _watch_disconnect(self, receive: Receive, call: Call, sink: _HttpSink) -> None:
        """Kill the handler when the client goes away (hypercorn will not)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not sink.finished:
                    self.caller.drop(call.key, "closed")
                return

    async def _signal(self, scope: Scope, send: Send, route: protocol.Route) -> None:
        """Stop or kill the running requests of ``route.endpoint`` with ``route.request_id`` that run for
        this caller (its credential is checked as a request's would be)."""
        assert route.request_id is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            calls = self.caller.find_own(
                route.endpoint, route.request_id, headers, scope.get("state", {}).get(CERTIFIED)
            )
        except IngressError as refusal:
            await _error(send, protocol.status_for(refusal), refusal)
            return
        for call in calls:
            if route.signal == "kill":
                self.caller.kill(call.key)
            else:
                self.caller.stop(call.key)
        if not calls:
            error = NotFound(
                f"no running request {route.request_id!r} on endpoint {route.endpoint!r} (finished already?)"
            )
            await _error(send, 404, error)
            return
        body = json.dumps({"signal": route.signal, "requests": len(calls)}).encode()
        await _respond(send, 202, protocol.JSON, body)

    async def _refuse_unread(
        self, receive: Receive, sink: _HttpSink, error: IngressError, headers: dict[str, str], http1: bool
    ) -> None:
        """Answer a refusal that came before the body was read. A caller that streams its body (h2, or a
        chunked HTTP/1.1 body: an exchange's caller may wait for an answer before it ends its input)
        hears it at once, and the rest of its body is read and dropped afterwards. A fixed-length
        HTTP/1.1 body is read first, so that the connection can carry the client's next request; a
        connection told to close needs no body read at all."""
        streamed = not http1 or "chunked" in headers.get("transfer-encoding", "").lower()
        closes = _closes_connection(error, http1)
        if not streamed and not closes:
            await self._discard_body(receive)
        await refuse(sink, error)
        if streamed and not closes:
            await self._discard_body(receive)

    async def _discard_body(self, receive: Receive) -> None:
        with trio.move_on_after(self.body_timeout):
            await discard_body(receive, self.max_body_size)

    async def _read_body(self, receive: Receive) -> bytearray:
        body = bytearray()
        with trio.move_on_after(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _GoneBeforeBody
                body += message.get("body", b"")
                if len(body) > self.max_body_size:
                    raise _BodyTooLarge(f"request body is larger than {self.max_body_size} bytes")
                if not message.get("more_body", False):
                    return body
        # Nothing was started, so sending it again (faster) is safe.
        raise _BodyTimedOut(
            f"the request body did not arrive within {self.body_timeout:g} s (body_timeout)", retryable=True
        )


class _BodyTooLarge(BadRequest):
    http_status = 413


class _BodyTimedOut(BadRequest):
    # The rest of the body may still come, so the connection cannot be reused (HTTP/1.1).
    http_status = 408


class _GoneBeforeBody(Exception):
    """The client left before sending its whole body: nothing to answer, nothing was started."""


def _is_http1(scope: Scope) -> bool:
    return str(scope.get("http_version", "1.1")).startswith("1")


def _closes_connection(error: IngressError, http1: bool) -> bool:
    """Whether answering ``error`` ends an HTTP/1.1 connection: a draining worker's refusal tells the
    client to go elsewhere, and a body that timed out may still be arriving. HTTP/2 forbids the header
    (RFC 9113 8.2.2: it would take the whole connection down)."""
    return http1 and (error.code in protocol.DRAINING_CODES or isinstance(error, _BodyTimedOut))


class _AsgiBody:
    """Lets the shared FrameWriter write SSE/NDJSON bytes as ASGI body messages."""

    def __init__(self, send: Send) -> None:
        self._send = send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send({"type": "http.response.body", "body": bytes(data), "more_body": True})


class _HttpSink:
    """Answers one HTTP call. Stream chunks go through a FrameWriter, so when the client is behind the
    queued chunks leave in one ASGI body message instead of one each."""

    def __init__(self, send: Send, ndjson: bool, headers: Headers, high_water: int, http1: bool) -> None:
        self.send = send
        self.http1 = http1
        self.ndjson = ndjson
        self.headers = headers
        self.high_water = high_water
        self.nursery: trio.Nursery | None = None
        self.writer: FrameWriter | None = None
        self.finished = False

    async def send_result(self, data: bytes) -> None:
        # Finished before the last send: hypercorn reports http.disconnect as soon as the response is
        # complete, and that must not read as the client leaving early.
        self.finished = True
        await _respond(self.send, 200, protocol.JSON, data, self.headers)

    async def send_chunk(self, data: bytes) -> None:
        writer = self.writer or await self._start_stream()
        await writer.write(protocol.ndjson_line(data) if self.ndjson else protocol.sse_data(data))

    async def send_end(self, chunks: int) -> None:
        writer = self.writer or await self._start_stream()
        if not self.ndjson:
            writer.write_nowait(protocol.sse_end(chunks))
        await self._finish(writer)

    async def send_error(self, error: IngressError, retryable: bool) -> None:
        if self.writer is None:
            extra = [(b"connection", b"close")] if _closes_connection(error, self.http1) else []
            self.finished = True  # see send_result
            await _error(self.send, protocol.status_for(error), error, retryable, self.headers + extra)
            return
        document = protocol.error_document(error, retryable)
        self.writer.write_nowait(
            protocol.ndjson_line(document) if self.ndjson else protocol.sse_error(document)
        )
        await self._finish(self.writer)

    async def _start_stream(self) -> FrameWriter:
        content_type = NDJSON.encode() if self.ndjson else protocol.EVENT_STREAM
        headers = [(b"content-type", content_type), (b"cache-control", b"no-cache"), *self.headers]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        assert self.nursery is not None
        self.writer = FrameWriter(_AsgiBody(self.send), self.high_water)
        self.writer.start(self.nursery, self._broken)
        return self.writer

    async def _finish(self, writer: FrameWriter) -> None:
        writer.finish()
        await writer.done.wait()
        if not self.finished:
            self.finished = True  # see send_result
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def _broken(self) -> None:
        # hypercorn's send() does not fail when the client is gone; _watch_disconnect deals with that.
        pass


async def _error(
    send: Send,
    status: int,
    error: IngressError,
    retryable: bool | None = None,
    extra: Headers | None = None,
) -> None:
    if retryable is None:
        retryable = error.resolve_retryable(chunks_sent=0)
    headers = list(extra or [])
    if retryable and not any(name == b"retry-after" for name, _ in headers):
        headers.append((b"retry-after", RETRY_AFTER))
    if error.code is ErrorCode.UNAUTHENTICATED:
        headers.append((b"www-authenticate", protocol.WWW_AUTHENTICATE))
    await _respond(send, status, protocol.JSON, protocol.error_document(error, retryable), headers)


async def _respond(
    send: Send, status: int, content_type: bytes, body: bytes, extra: Headers | None = None
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    # Returning without answering makes hypercorn's trio serve() fail at start-up (ClosedResourceError).
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
