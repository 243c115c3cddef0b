"""``ingress`` command-line plug-in of the HTTP transport (entry point ``trio_ingress.transports``)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import trio

from runtime import Transport
from runtime.plugins import (
    CallTarget,
    DuplexTarget,
    StatusTarget,
    TlsFiles,
    UsageError,
    address,
    client_tls,
    positive_int,
)

DEFAULT_ADDRESS = ("127.0.0.1", 8000)


class HttpPlugin:
    name = "http"
    serves_tls = True

    def add_serve_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--http",
            type=address,
            metavar="HOST:PORT",
            help="serve HTTP/1.1 and h2 here (with no transport flag at all, every installed transport "
            "serves on its default address: HTTP 127.0.0.1:8000)",
        )
        parser.add_argument(
            "--http-backlog",
            type=positive_int,
            default=4096,
            metavar="N",
            help="listen queue of the HTTP port, capped by net.core.somaxconn",
        )

    def transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        if args.http is None:
            return None

        return _transport(args.http, args, tls)

    def default_transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        return _transport(DEFAULT_ADDRESS, args, tls)  # something to curl

    def add_call_arguments(self, parser: Any, target: Any) -> None:
        target.add_argument("--http", metavar="URL", help="e.g. http://127.0.0.1:8000 or https://host:8443")

    def call_target(self, args: argparse.Namespace) -> CallTarget | None:
        if args.http is None:
            return None
        from ._client import http_stream

        url, tls = _base_url(args.http), client_tls(args)

        async def stream(
            endpoint: str, request: Any, metadata: Mapping[str, str], deadline: float | None
        ) -> AsyncIterator[Any]:
            timed = _with_deadline(metadata, deadline)
            async for chunk in http_stream(url, endpoint, request, timed, tls=tls):
                yield chunk

        return stream

    def default_call_target(self, args: argparse.Namespace) -> CallTarget | None:
        return None

    def duplex_target(self, args: argparse.Namespace) -> DuplexTarget | None:
        if args.http is None:
            return None
        from ._client import http_exchange

        url, tls = _base_url(args.http), client_tls(args)

        async def exchange(
            endpoint: str,
            messages: AsyncIterator[Any],
            metadata: Mapping[str, str],
            deadline: float | None,
            answer: Callable[[Any], None],
        ) -> None:
            timed = _with_deadline(metadata, deadline)
            await http_exchange(url, endpoint, messages, timed, answer, tls=tls)

        return exchange

    def status_target(self, args: argparse.Namespace) -> StatusTarget | None:
        if args.http is None:
            return None
        from ._client import http_status

        url, tls = _base_url(args.http), client_tls(args)
        return lambda: http_status(url, tls=tls)


def _base_url(text: str) -> str:
    from ._client import parse_base_url

    try:
        return parse_base_url(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _with_deadline(metadata: Mapping[str, str], deadline: float | None) -> Mapping[str, str]:
    """The caller's deadline as the worker's timeout header (its remaining budget, in ms)."""
    if deadline is None:
        return metadata
    from ._protocol import TIMEOUT_HEADER

    remaining_ms = max(1, int((deadline - trio.current_time()) * 1000))
    return {**metadata, TIMEOUT_HEADER: str(remaining_ms)}


def _transport(address: tuple[str, int], args: argparse.Namespace, tls: TlsFiles | None) -> Transport:
    from ._server import HttpTransport

    if tls is None:
        return HttpTransport(*address, backlog=args.http_backlog)
    return HttpTransport(
        *address,
        certfile=tls.certfile,
        keyfile=tls.keyfile,
        client_ca=tls.client_ca,
        backlog=args.http_backlog,
    )


plugin = HttpPlugin()
