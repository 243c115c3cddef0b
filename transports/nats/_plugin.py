"""``ingress`` command-line plug-in of the NATS transport (entry point ``trio_ingress.transports``)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from runtime import Transport
from runtime.plugins import CallTarget, DuplexTarget, StatusTarget, TlsFiles, run_exchange, seconds

from ._protocol import check_url


class NatsPlugin:
    name = "nats"
    serves_tls = False  # NATS keeps its own TLS (--nats-tls-ca) and credentials

    def add_serve_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--nats", type=_nats_url, metavar="URL", help="serve through this NATS server (queue groups)"
        )
        parser.add_argument("--namespace", default="ingress", help="NATS subject prefix")
        parser.add_argument(
            "--nats-startup-timeout",
            type=seconds,
            default=30.0,
            metavar="S",
            help="keep trying an unreachable NATS server this long at start-up, then exit 1",
        )
        _auth_arguments(parser)

    def transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        if args.nats is None:
            return None
        from ._server import NatsTransport

        return NatsTransport(
            args.nats,
            args.namespace,
            connect_options=_connect_options(args),
            startup_timeout=args.nats_startup_timeout,
        )

    def default_transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        return None  # there is no NATS server to assume

    def add_call_arguments(self, parser: Any, target: Any) -> None:
        target.add_argument("--nats", type=_nats_url, metavar="URL", help="e.g. nats://127.0.0.1:4222")
        parser.add_argument("--namespace", default="ingress", help="NATS subject prefix (with --nats)")
        _auth_arguments(parser)

    def call_target(self, args: argparse.Namespace) -> CallTarget | None:
        if args.nats is None:
            return None
        url, namespace, options = args.nats, args.namespace, _connect_options(args)

        async def stream(
            endpoint: str, request: Any, metadata: Mapping[str, str], deadline: float | None
        ) -> AsyncIterator[Any]:
            from ._client import NatsClient

            async with NatsClient.connect(url, namespace=namespace, connect_options=options) as client:
                async for chunk in client.stream(
                    endpoint, request, metadata=dict(metadata), deadline=deadline
                ):
                    yield chunk

        return stream

    def default_call_target(self, args: argparse.Namespace) -> CallTarget | None:
        return None

    def duplex_target(self, args: argparse.Namespace) -> DuplexTarget | None:
        url, namespace, options = args.nats, args.namespace, _connect_options(args)

        async def exchange(
            endpoint: str,
            messages: AsyncIterator[Any],
            metadata: Mapping[str, str],
            deadline: float | None,
            answer: Callable[[Any], None],
        ) -> None:
            from ._client import NatsClient

            async with (
                NatsClient.connect(url, namespace=namespace, connect_options=options) as client,
                client.exchange(endpoint, metadata=dict(metadata), deadline=deadline) as session,
            ):
                await run_exchange(session, messages, answer)

        return exchange

    def status_target(self, args: argparse.Namespace) -> StatusTarget | None:
        if args.nats is None:
            return None
        url, namespace, options = args.nats, args.namespace, _connect_options(args)

        async def status() -> dict[str, Any]:
            from ._client import NatsClient

            async with NatsClient.connect(url, namespace=namespace, connect_options=options) as client:
                return await client.status()

        return status


def _nats_url(text: str) -> str:
    # The same check NatsTransport and NatsClient make, as a usage error (exit 2) instead of a failure.
    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _auth_arguments(parser: Any) -> None:
    parser.add_argument("--nats-token", metavar="TOKEN", help="NATS token authentication")
    parser.add_argument("--nats-creds", metavar="FILE", help="NATS credentials file (JWT and nkey seed)")
    parser.add_argument("--nats-tls-ca", metavar="PEM", help="connect to NATS over TLS, trusting this CA")


def _connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """The nats.connect options the command line asked for."""
    options: dict[str, Any] = {}
    if args.nats_token:
        options["token"] = args.nats_token
    if args.nats_creds:
        options["user_credentials"] = args.nats_creds
    if args.nats_tls_ca:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=args.nats_tls_ca)
    return options


plugin = NatsPlugin()
