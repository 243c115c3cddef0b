"""The ASGI application behind the HTTP transport.

Routes: ``POST /v1/{endpoint}`` (JSON body), ``GET /health``, ``GET /ready``, ``GET /metrics``. A unary
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
    BadRequest,
    EndpointBinding,
    ErrorCode,
    IngressError,
    NotFound,
    RequestContext,
    TransportBinding,
    Unavailable,
    dispatch_payload,
    new_request_id,
)
from runtime._http_server import discard_body
from runtime._ops_server import OPS_PATHS, OpsApp

from .._writer import FrameWriter

Scope = dict[str, Any]
Receive = Any
Send = Any

STATUS_FOR_CODE = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,  # nginx's "client closed request"; only seen if a handler raises it
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 500,
}
# Seconds a client should wait before retrying a 429 or 503 (on this worker or, better, another).
RETRY_AFTER = "1"
TIMEOUT_HEADER = "x-request-timeout-ms"
REQUEST_ID_HEADER = "x-request-id"
NDJSON = "application/x-ndjson"
# Refusals of a draining worker: on HTTP/1.1 they also close the connection (HTTP/2 forbids the header).
_DRAINING_CODES = (ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE)


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
        self.ops = OpsApp(lambda: binding.is_ready(), binding.runtime.metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path.startswith("/v1/"):
            if method != "POST":
                await self._discard_body(receive)
                await _error(send, 405, BadRequest(f"use POST for {path}"), extra=[(b"allow", b"POST")])
            else:
                await self._call(scope, receive, send, path[len("/v1/") :])
        elif path in OPS_PATHS:
            await self.ops(scope, receive, send)  # the same app as the --metrics listener
        else:
            error = NotFound(f"no route {method} {path}; endpoints are POST /v1/{{endpoint}}")
            await self._discard_body(receive)
            await _error(send, 404, error)

    async def _call(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get(REQUEST_ID_HEADER) or new_request_id()
        id_header = [(REQUEST_ID_HEADER.encode(), request_id.encode("latin-1"))]
        try:
            binding = self.binding.lookup(endpoint)
            if not binding.accepting:
                binding.metrics.rejection("unavailable")
                raise Unavailable("worker is draining; send new requests elsewhere", retryable=True)
            with trio.move_on_after(self.body_timeout) as body_timer:
                body = await self._read_body(receive)
            if body_timer.cancelled_caught:
                # The rest of a body may still come; the connection cannot be reused (HTTP/1.1).
                close = [(b"connection", b"close")] if _is_http1(scope) else []
                await _error(send, 408, _body_timed_out(self.body_timeout), extra=id_header + close)
                return
        except _BodyTooLarge as too_large:
            await _error(send, 413, too_large.error, extra=id_header)
            return
        except IngressError as error:
            close = _go_elsewhere(error, _is_http1(scope))
            if not close:  # a connection told to close needs no body read to be reused
                await self._discard_body(receive)
            await _error(send, STATUS_FOR_CODE[error.code], error, extra=id_header + close)
            return
        client = scope.get("client")
        ctx = RequestContext(
            id=request_id,
            endpoint=binding.name,
            transport="http",
            runtime=self.binding.runtime,
            peer=f"{client[0]}:{client[1]}" if client else None,
            metadata=headers,
        )
        binding.accept(ctx)
        ndjson = NDJSON in headers.get("accept", "")
        sink = _HttpSink(send, ndjson, id_header, self.stream_high_water, http1=_is_http1(scope))
        await self._run(binding, ctx, body, sink, receive)

    async def _run(
        self,
        binding: EndpointBinding,
        ctx: RequestContext,
        body: bytearray,
        sink: _HttpSink,
        receive: Receive,
    ) -> None:
        timeout_ms = ctx.metadata.get(TIMEOUT_HEADER)
        async with trio.open_nursery() as nursery:
            sink.nursery = nursery
            nursery.start_soon(_watch_disconnect, receive, ctx, sink)
            try:
                await dispatch_payload(
                    binding, ctx, body, sink, timeout_ms=timeout_ms, timeout_name=TIMEOUT_HEADER
                )
            finally:
                nursery.cancel_scope.cancel(reason="request finished")

    async def _discard_body(self, receive: Receive) -> None:
        with trio.move_on_after(self.body_timeout):
            await discard_body(receive, self.max_body_size)

    async def _read_body(self, receive: Receive) -> bytearray:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _GoneBeforeBody
            body += message.get("body", b"")
            if len(body) > self.max_body_size:
                raise _BodyTooLarge(BadRequest(f"request body is larger than {self.max_body_size} bytes"))
            if not message.get("more_body", False):
                return body


class _BodyTooLarge(Exception):
    def __init__(self, error: IngressError) -> None:
        self.error = error


class _GoneBeforeBody(Unavailable):
    """The client left before sending its whole body: nothing to answer, nothing was started."""

    def __init__(self) -> None:
        super().__init__("client disconnected before sending the request body")


def _body_timed_out(body_timeout: float) -> BadRequest:
    # Nothing was started, so sending it again (faster) is safe.
    message = f"the request body did not arrive within {body_timeout:g} s (body_timeout)"
    return BadRequest(message, retryable=True)


def _is_http1(scope: Scope) -> bool:
    return str(scope.get("http_version", "1.1")).startswith("1")


def _go_elsewhere(error: IngressError, http1: bool) -> list[tuple[bytes, bytes]]:
    """``Connection: close`` for a draining worker's refusal on HTTP/1.1, which tells the client to go
    elsewhere; HTTP/2 forbids the header (RFC 9113 8.2.2: it would take the whole connection down)."""
    return [(b"connection", b"close")] if http1 and error.code in _DRAINING_CODES else []


async def _watch_disconnect(receive: Receive, ctx: RequestContext, sink: _HttpSink) -> None:
    """Kill the handler when the client goes away (hypercorn will not)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not sink.finished:
                ctx.caller_gone("closed")
            return


class _AsgiBody:
    """Lets the shared FrameWriter write SSE/NDJSON bytes as ASGI body messages."""

    def __init__(self, send: Send) -> None:
        self._send = send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send({"type": "http.response.body", "body": bytes(data), "more_body": True})


class _HttpSink:
    """Answers one HTTP call. Stream chunks go through a FrameWriter, so when the client is behind the
    queued chunks leave in one ASGI body message instead of one each."""

    def __init__(
        self, send: Send, ndjson: bool, headers: list[tuple[bytes, bytes]], high_water: int, http1: bool
    ) -> None:
        self.send = send
        self.http1 = http1
        self.ndjson = ndjson
        self.headers = headers
        self.high_water = high_water
        self.nursery: trio.Nursery | None = None
        self.writer: FrameWriter | None = None
        self.finished = False
        self.chunks = 0

    async def send_result(self, data: bytes) -> None:
        # Finished before the last send: hypercorn reports http.disconnect as soon as the response is
        # complete, and that must not read as the client leaving early.
        self.finished = True
        await _respond(self.send, 200, b"application/json", data, self.headers)

    async def send_chunk(self, data: bytes) -> None:
        writer = self.writer or await self._start_stream()
        self.chunks += 1
        await writer.write(data + b"\n" if self.ndjson else b"data: " + data + b"\n\n")

    async def send_end(self) -> None:
        writer = self.writer or await self._start_stream()
        if not self.ndjson:
            writer.write_nowait(b'event: end\ndata: {"chunks":%d}\n\n' % self.chunks)
        await self._finish(writer)

    async def send_error(self, error: IngressError, retryable: bool) -> None:
        if self.writer is None:
            extra = [(b"retry-after", RETRY_AFTER.encode())] if retryable else []
            extra += _go_elsewhere(error, self.http1)
            self.finished = True  # see send_result
            await _error(self.send, STATUS_FOR_CODE[error.code], error, retryable, self.headers + extra)
            return
        payload = json.dumps({"error": _error_body(error, retryable)}).encode()
        self.writer.write_nowait(
            payload + b"\n" if self.ndjson else b"event: error\ndata: " + payload + b"\n\n"
        )
        await self._finish(self.writer)

    async def _start_stream(self) -> FrameWriter:
        content_type = NDJSON.encode() if self.ndjson else b"text/event-stream"
        headers = [(b"content-type", content_type), (b"cache-control", b"no-cache"), *self.headers]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        assert self.nursery is not None
        self.writer = FrameWriter(_AsgiBody(self.send), self.high_water)
        self.nursery.start_soon(self.writer.run, self._broken)
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


def _error_body(error: IngressError, retryable: bool | None = None) -> dict[str, Any]:
    if retryable is None:
        retryable = error.resolve_retryable(chunks_sent=0)
    return {"code": error.code.name, "message": error.message, "retryable": retryable}


async def _error(
    send: Send,
    status: int,
    error: IngressError,
    retryable: bool | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = _error_body(error, retryable)
    headers = list(extra or [])
    if body["retryable"] and not any(name == b"retry-after" for name, _ in headers):
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    await _respond(send, status, b"application/json", json.dumps({"error": body}).encode(), headers)


async def _respond(
    send: Send, status: int, content_type: bytes, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
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
