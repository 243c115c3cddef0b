"""``ingress`` command-line plug-in of the TCP transport (entry point ``trio_ingress.transports``)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from runtime import Transport, Unavailable
from runtime.plugins import CallTarget, DuplexTarget, StatusTarget, TlsFiles, address, run_exchange

DEFAULT_ADDRESS = ("127.0.0.1", 9000)


class TcpPlugin:
    name = "tcp"
    serves_tls = False

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
        from ._server import TcpTransport

        return TcpTransport(*args.tcp)

    def default_transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        from ._server import TcpTransport

        return TcpTransport(*DEFAULT_ADDRESS)

    def add_call_arguments(self, parser: Any, target: Any) -> None:
        target.add_argument("--tcp", type=address, metavar="HOST:PORT", help="default 127.0.0.1:9000")

    def call_target(self, args: argparse.Namespace) -> CallTarget | None:
        return None if args.tcp is None else _stream_to(args.tcp)

    def default_call_target(self, args: argparse.Namespace) -> CallTarget | None:
        return _stream_to(DEFAULT_ADDRESS)

    def duplex_target(self, args: argparse.Namespace) -> DuplexTarget | None:
        return _exchange_with(args.tcp or DEFAULT_ADDRESS)

    def status_target(self, args: argparse.Namespace) -> StatusTarget | None:
        return None if args.tcp is None else _status_of(args.tcp)


def _stream_to(address: tuple[str, int]) -> CallTarget:
    async def stream(
        endpoint: str, request: Any, metadata: Mapping[str, str], deadline: float | None
    ) -> AsyncIterator[Any]:
        from ._client import TcpClient

        async with TcpClient.connect(*address) as client:
            async for chunk in client.stream(endpoint, request, metadata=dict(metadata), deadline=deadline):
                yield chunk

    return stream


def _status_of(address: tuple[str, int]) -> StatusTarget:
    async def status() -> dict[str, Any]:
        from ._client import TcpClient

        async with TcpClient.connect(*address, heartbeat_interval=None) as client:
            report = await client.ping()
        if report is None:
            raise Unavailable(f"the worker at {address[0]}:{address[1]} sent no load report", retryable=False)
        return report

    return status


def _exchange_with(address: tuple[str, int]) -> DuplexTarget:
    async def exchange(
        endpoint: str,
        messages: AsyncIterator[Any],
        metadata: Mapping[str, str],
        deadline: float | None,
        answer: Callable[[Any], None],
    ) -> None:
        from ._client import TcpClient

        async with (
            TcpClient.connect(*address) as client,
            client.exchange(endpoint, metadata=dict(metadata), deadline=deadline) as session,
        ):
            await run_exchange(session, messages, answer)

    return exchange


plugin = TcpPlugin()
