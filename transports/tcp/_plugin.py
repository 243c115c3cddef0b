"""``ingress`` command-line plug-in of the TCP transport (entry point ``trio_ingress.transports``)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import trio

from runtime import IngressError, Transport
from runtime._errors import sole_exception
from runtime.plugins import CallTarget, DuplexTarget, TlsFiles, address

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


def _stream_to(address: tuple[str, int]) -> CallTarget:
    async def stream(
        endpoint: str, request: Any, metadata: Mapping[str, str], deadline: float | None
    ) -> AsyncIterator[Any]:
        from ._client import TcpClient

        async with TcpClient.connect(*address) as client:
            async for chunk in client.stream(endpoint, request, metadata=dict(metadata), deadline=deadline):
                yield chunk

    return stream


def _exchange_with(address: tuple[str, int]) -> DuplexTarget:
    async def exchange(
        endpoint: str,
        messages: AsyncIterator[Any],
        metadata: Mapping[str, str],
        deadline: float | None,
        answer: Callable[[Any], None],
    ) -> None:
        from ._client import TcpClient

        try:
            async with (
                TcpClient.connect(*address) as client,
                client.exchange(endpoint, metadata=dict(metadata), deadline=deadline) as session,
                trio.open_nursery() as nursery,
            ):

                async def send_all() -> None:
                    async for message in messages:
                        await session.send(message)
                    await session.end()

                nursery.start_soon(send_all)
                async for chunk in session:
                    answer(chunk)
                nursery.cancel_scope.cancel()  # the worker ended the exchange: stop reading the input
        except BaseExceptionGroup as group:
            # The sender's error (a bad line of input, an exchange that ended under it) as itself.
            error = sole_exception(group)
            if isinstance(error, IngressError):
                raise error from None
            raise

    return exchange


plugin = TcpPlugin()
