"""A small HTTP/1.1 client for ``ingress call --http``: one request per connection, on h11.

Streams are requested as NDJSON (one JSON document per line) because it is the simplest format to read
incrementally; a unary answer is one JSON document. Errors become ``RemoteError`` with the body's code and
``retryable``, the same as the TCP client's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from runtime import ErrorCode, RemoteError, Unavailable

RECEIVE_SIZE = 65536


def parse_base_url(url: str) -> tuple[str, int]:
    """``http://host:port`` (or ``host:port``) -> (host, port); only cleartext HTTP is supported here."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"expected a URL like http://127.0.0.1:8000, got {url!r}")
    return parts.hostname, parts.port or 80


async def http_stream(
    url: str, endpoint: str, request: Any, metadata: Mapping[str, str] | None = None
) -> AsyncIterator[Any]:
    """POST ``request`` to ``/v1/{endpoint}`` and yield each chunk (one for a unary endpoint)."""
    host, port = parse_base_url(url)
    body = json.dumps(request).encode()
    headers = [
        ("host", f"{host}:{port}"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("accept", "application/x-ndjson"),
        ("connection", "close"),
        *(metadata or {}).items(),
    ]
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise Unavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}", retryable=True) from exc
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(
            conn.send(h11.Request(method="POST", target=f"/v1/{endpoint}", headers=headers))
        )
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        response = await _next_event(conn, stream)
        assert isinstance(response, h11.Response)
        if response.status_code != 200:
            raise _remote_error(await _read_all(conn, stream), response.status_code)
        async for chunk in _chunks(conn, stream):
            yield chunk


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(RECEIVE_SIZE))


async def _read_all(conn: h11.Connection, stream: trio.SocketStream) -> bytes:
    body = bytearray()
    while isinstance(event := await _next_event(conn, stream), h11.Data):
        body += event.data
    return bytes(body)


async def _chunks(conn: h11.Connection, stream: trio.SocketStream) -> AsyncIterator[Any]:
    pending = b""
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.EndOfMessage):
            if pending.strip():
                yield _chunk(pending)
            return
        if not isinstance(event, h11.Data):
            raise Unavailable("the worker closed the connection mid-answer", retryable=False)
        *lines, pending = (pending + event.data).split(b"\n")
        for line in lines:
            if line.strip():
                yield _chunk(line)


def _chunk(line: bytes) -> Any:
    value = json.loads(line)
    if isinstance(value, dict) and set(value) == {"error"}:
        raise _remote_error(line, 200)
    return value


def _remote_error(body: bytes, status: int) -> RemoteError:
    try:
        error = json.loads(body)["error"]
        return RemoteError(ErrorCode[error["code"]], error["message"], retryable=bool(error["retryable"]))
    except (ValueError, KeyError, TypeError):
        return RemoteError(ErrorCode.INTERNAL, f"HTTP {status}: {body[:200]!r}", retryable=False)
