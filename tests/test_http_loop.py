"""The HTTP connection loop itself (runtime/_http_server.py), with tiny ASGI apps and real sockets: when
it closes a connection, and when it tells an app that its client is gone."""

from __future__ import annotations

import socket
import struct
from typing import Any

import trio
import trio.testing
from hypercorn.config import Config
from structlog.testing import capture_logs

from runtime._http_server import HttpServerLimits, serve_http

BIG = 4 * 1024 * 1024  # far more than the socket buffers hold: the writer is still sending for a while


async def _big_response(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % BIG)]})
    await send({"type": "http.response.body", "body": b"x" * BIG})


def _reset(sock: trio.socket.SocketType) -> None:
    """Close with RST (SO_LINGER 0), as a client that crashed or a load balancer's probe does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _read_to_eof(sock: trio.socket.SocketType) -> bytes:
    received = bytearray()
    while data := await sock.recv(65536):
        received += data
    return bytes(received)


async def test_a_big_response_to_a_slow_reader_is_not_cut_by_linger_or_keep_alive(autojump_clock):
    """A body still being written when the linger (2 s) and keep-alive (5 s) times pass arrives whole."""
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            serve_http, _big_response, Config(), HttpServerLimits(), "127.0.0.1", 0
        )
        for close in (b"connection: close\r\n", b""):
            with trio.socket.socket() as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                await client.connect((host, port))
                await client.send(b"GET / HTTP/1.1\r\nhost: t\r\n" + close + b"\r\n")
                await trio.sleep(30)  # mock time: a reader far slower than both timeouts
                if close:
                    received = await _read_to_eof(client)
                else:
                    received = b""
                    while not received.endswith(b"x" * 1024) or len(received) < BIG:
                        received += await client.recv(65536)
            assert received.count(b"x") == BIG, close
        nursery.cancel_scope.cancel()


async def test_a_client_that_resets_behind_a_paused_request_is_told_at_once(autojump_clock):
    """HTTP/1.1 with a stray CRLF after the request (the parser pauses): a reset still ends the handler."""
    chunks_sent: list[int] = []
    gone = trio.Event()

    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for sent in range(100):
                await send({"type": "http.response.body", "body": b"x" * 1000 + b"\n", "more_body": True})
                chunks_sent.append(sent)
                await trio.sleep(1)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_http, stream, Config(), HttpServerLimits(), "127.0.0.1", 0)
        client = trio.socket.socket()
        await client.connect((host, port))
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}\r\n")
        await client.recv(65536)  # the stream is running
        _reset(client)
        with trio.fail_after(10):  # mock seconds: the stream alone would take 100
            await gone.wait()
        nursery.cancel_scope.cancel()
    assert len(chunks_sent) < 10


async def test_a_connection_reset_before_it_is_served_logs_nothing():
    """Connect-and-reset probes (health checks, port scans) leave no warning or traceback behind."""
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                serve_http, _big_response, Config(), HttpServerLimits(), "127.0.0.1", 0
            )
            for _ in range(10):
                client = trio.socket.socket()
                await client.connect((host, port))
                _reset(client)  # before the server's accept loop has even run again
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            nursery.cancel_scope.cancel()
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")]
