"""A third-party transport, registered through the ``trio_ingress.transports`` entry point of the
distribution next to it (``demo_line_transport-0.1.dist-info``): nothing in runtime/ knows about it.

The protocol is one request per line, ``ENDPOINT JSON``; the answer is ``data JSON`` lines, then
``end N`` or ``error JSON``. It is built only from the core's public intake (Caller, Call, refuse).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import trio

from runtime import (
    BadRequest,
    Caller,
    CallerGone,
    IngressError,
    TransportBinding,
    decode_error,
    encode_error,
    refuse,
)
from runtime.plugins import address


class LineTransport:
    name = "line"

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def serve(self, binding: TransportBinding, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        task_status.started(listeners[0].socket.getsockname()[:2])
        await trio.serve_listeners(partial(self._connection, binding), listeners)

    async def _connection(self, binding: TransportBinding, stream: trio.SocketStream) -> None:
        caller = Caller(binding, peer="line")  # this connection's open requests
        async with stream, trio.open_nursery() as nursery:
            try:
                await self._read_requests(caller, stream, nursery)
                reason = "closed"
            except (trio.BrokenResourceError, CallerGone):
                reason = "reset"
            caller.gone(reason)  # every request still running is cancelled and counted, once

    async def _read_requests(self, caller: Caller, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        keys = itertools.count()
        send_lock = trio.Lock()  # the connection's requests answer concurrently: one write at a time
        buffer = b""
        while data := await stream.receive_some():
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                endpoint, _, payload = line.partition(b" ")
                sink = _LineSink(stream, send_lock)
                try:
                    if not endpoint or not endpoint.isascii():
                        raise BadRequest("a line is ENDPOINT JSON, with an ASCII endpoint name")
                    call = caller.open(next(keys), endpoint.decode("ascii"))
                except IngressError as error:
                    await refuse(sink, error)
                    continue
                nursery.start_soon(call.run, payload, sink)


class _LineSink:
    def __init__(self, stream: trio.SocketStream, lock: trio.Lock) -> None:
        self.stream, self.lock = stream, lock

    async def send_chunk(self, data: bytes) -> None:
        await self._send(b"data " + data + b"\n")

    async def send_result(self, data: bytes) -> None:
        await self._send(b"data " + data + b"\nend 1\n")

    async def send_end(self, chunks: int) -> None:
        await self._send(b"end %d\n" % chunks)

    async def send_error(self, error: IngressError, retryable: bool) -> None:
        await self._send(b"error " + encode_error(error, retryable) + b"\n")

    async def _send(self, line: bytes) -> None:
        try:
            async with self.lock:
                await self.stream.send_all(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise CallerGone from None  # the core counts a disconnect; the worker goes on


async def _call(
    address: tuple[str, int], endpoint: str, request: Any, metadata: Any, deadline: Any
) -> AsyncIterator[Any]:
    """The client side: one request on its own connection; its data lines, until end or error."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(f"{endpoint} {json.dumps(request)}\n".encode())
        buffer = b""
        while data := await stream.receive_some():
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                kind, _, rest = line.partition(b" ")
                if kind == b"data":
                    yield json.loads(rest)
                elif kind == b"error":
                    raise decode_error(rest)
                else:
                    return


class LinePlugin:
    name = "line"
    serves_tls = False

    def add_serve_arguments(self, parser: Any) -> None:
        parser.add_argument("--line", type=address, metavar="HOST:PORT", help="serve the line protocol here")

    def transport(self, args: Any, tls: Any) -> LineTransport | None:
        return None if args.line is None else LineTransport(*args.line)

    def default_transport(self, args: Any, tls: Any) -> None:
        return None

    def add_call_arguments(self, parser: Any, target: Any) -> None:
        target.add_argument("--line", type=address, metavar="HOST:PORT", help="call over the line protocol")

    def call_target(self, args: Any) -> Any:
        # No duplex_target: this transport cannot run exchanges, and `call --duplex --line` says so.
        return None if args.line is None else partial(_call, args.line)

    def default_call_target(self, args: Any) -> None:
        return None


plugin = LinePlugin()
