"""The HTTP client behind ``ingress call --http``: httpx, over HTTP/1.1 or (by ALPN, on https) HTTP/2.

Streams are requested as NDJSON (one JSON document per line) because it is the simplest format to read
incrementally; a unary answer is one JSON document. Errors become ``RemoteError`` with the body's code and
``retryable``, the same as the TCP client's; httpx's own failures are translated here, in one place.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from runtime import Unavailable

from . import _protocol as protocol


def parse_base_url(url: str) -> str:
    """``http://host:port``, ``https://host:port`` (or ``host:port``, meaning http) as a base URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # .port: not a number, or out of range
        valid = False
    if not valid:
        raise ValueError(f"expected a URL like http://127.0.0.1:8000 or https://host:8443, got {url!r}")
    return parts.geturl()


async def http_stream(
    url: str,
    endpoint: str,
    request: Any,
    metadata: Mapping[str, str] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Any]:
    """POST ``request`` to ``/v1/{endpoint}`` and yield each chunk (one for a unary endpoint).
    ``tls``: the context for https (``runtime._tls.client_context``: a CA to trust, a client
    certificate for mutual TLS); None: the system's CAs."""
    verify: ssl.SSLContext | bool = tls or True
    headers = {"content-type": "application/json", "accept": protocol.NDJSON, **(metadata or {})}
    # No httpx timeout: a stream may run for minutes; the caller's scope (--timeout) bounds it.
    async with httpx.AsyncClient(
        base_url=parse_base_url(url), verify=verify, http2=True, timeout=None
    ) as client:
        try:
            async with client.stream(
                "POST", f"/v1/{endpoint}", content=json.dumps(request), headers=headers
            ) as response:
                if response.status_code != 200:
                    raise protocol.decode_error_document(await response.aread(), response.status_code)
                async for chunk in _chunks(response):
                    yield chunk
        except httpx.ConnectError as exc:
            raise Unavailable(f"cannot connect to {url}: {exc}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"the worker at {url} went away mid-answer: {exc}", retryable=False) from exc


async def http_status(url: str, *, tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    """GET ``/status``: the worker's live state (served on its HTTP port and its ops listener)."""
    verify: ssl.SSLContext | bool = tls or True
    async with httpx.AsyncClient(base_url=parse_base_url(url), verify=verify, timeout=None) as client:
        try:
            response = await client.get("/status")
            response.raise_for_status()
            report: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable(f"no status from {url}/status: {exc}", retryable=True) from exc
    return report


async def http_exchange(
    url: str,
    endpoint: str,
    messages: AsyncIterator[Any],
    metadata: Mapping[str, str],
    answer: Callable[[Any], None],
    *,
    tls: ssl.SSLContext | None = None,
) -> None:
    """An exchange over HTTP: the messages go out as the NDJSON lines of a streamed request body (its
    end is the half-close), and ``answer`` gets each answer as its line arrives. httpx sends the whole
    body before it reads the response, so the answers come once the input has ended (docs/exchanges.md)."""

    async def body() -> AsyncIterator[bytes]:
        async for message in messages:
            yield json.dumps(message).encode() + b"\n"

    verify: ssl.SSLContext | bool = tls or True
    headers = {"content-type": protocol.NDJSON, "accept": protocol.NDJSON, **metadata}
    async with httpx.AsyncClient(
        base_url=parse_base_url(url), verify=verify, http2=True, timeout=None
    ) as client:
        try:
            async with client.stream("POST", f"/v1/{endpoint}", content=body(), headers=headers) as response:
                if response.status_code != 200:
                    raise protocol.decode_error_document(await response.aread(), response.status_code)
                async for chunk in _chunks(response):
                    answer(chunk)
        except httpx.ConnectError as exc:
            raise Unavailable(f"cannot connect to {url}: {exc}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"the worker at {url} went away mid-answer: {exc}", retryable=False) from exc


async def _chunks(response: httpx.Response) -> AsyncIterator[Any]:
    pending = b""
    async for data in response.aiter_bytes():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.strip():
                yield protocol.ndjson_value(line)
    if pending.strip():
        yield protocol.ndjson_value(pending)
