"""``ingress`` command-line plug-in of the TCP transport (entry point ``trio_ingress.transports``)."""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from runtime import Transport, Unavailable
from runtime.plugins import (
    CallTarget,
    DuplexTarget,
    StatusTarget,
    TlsFiles,
    address,
    client_tls,
    run_exchange,
)

DEFAULT_ADDRESS = ("127.0.0.1", 9000)


class TcpPlugin:
    name = "tcp"
    serves_tls = True

    def add_serve_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--tcp",
            type=address,
            metavar="HOST:PORT",
            help="serve the TCP protocol here (with no transport flag at all: 127.0.0.1:9000)",
        )

    def transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        if args.tcp is None:
            return None
        return _transport(args.tcp, tls)

    def default_transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        return _transport(DEFAULT_ADDRESS, tls)

    def add_call_arguments(self, parser: Any, target: Any) -> None:
        target.add_argument("--tcp", type=address, metavar="HOST:PORT", help="default 127.0.0.1:9000")

    def call_target(self, args: argparse.Namespace) -> CallTarget | None:
        return None if args.tcp is None else _stream_to(args.tcp, client_tls(args))

    def default_call_target(self, args: argparse.Namespace) -> CallTarget | None:
        return _stream_to(DEFAULT_ADDRESS, client_tls(args))

    def duplex_target(self, args: argparse.Namespace) -> DuplexTarget | None:
        return _exchange_with(args.tcp or DEFAULT_ADDRESS, client_tls(args))

    def status_target(self, args: argparse.Namespace) -> StatusTarget | None:
        return None if args.tcp is None else _status_of(args.tcp, client_tls(args))


def _transport(address: tuple[str, int], tls: TlsFiles | None) -> Transport:
    from ._server import TcpTransport

    if tls is None:
        return TcpTransport(*address)
    return TcpTransport(*address, certfile=tls.certfile, keyfile=tls.keyfile, client_ca=tls.client_ca)


def _stream_to(address: tuple[str, int], tls: ssl.SSLContext | None) -> CallTarget:
    async def stream(
        endpoint: str, request: Any, metadata: Mapping[str, str], deadline: float | None
    ) -> AsyncIterator[Any]:
        from ._client import TcpClient

        async with TcpClient.connect(*address, tls=tls) as client:
            async for chunk in client.stream(endpoint, request, metadata=dict(metadata), deadline=deadline):
                yield chunk

    return stream


def _status_of(address: tuple[str, int], tls: ssl.SSLContext | None) -> StatusTarget:
    async def status() -> dict[str, Any]:
        from ._client import TcpClient

        async with TcpClient.connect(*address, heartbeat_interval=None, tls=tls) as client:
            report = await client.ping()
        if report is None:
            raise Unavailable(f"the worker at {address[0]}:{address[1]} sent no load report", retryable=False)
        return report

    return status


def _exchange_with(address: tuple[str, int], tls: ssl.SSLContext | None) -> DuplexTarget:
    async def exchange(
        endpoint: str,
        messages: AsyncIterator[Any],
        metadata: Mapping[str, str],
        deadline: float | None,
        answer: Callable[[Any], None],
    ) -> None:
        from ._client import TcpClient

        async with (
            TcpClient.connect(*address, tls=tls) as client,
            client.exchange(endpoint, metadata=dict(metadata), deadline=deadline) as session,
        ):
            await run_exchange(session, messages, answer)

    return exchange


plugin = TcpPlugin()
