"""The HTTP transport: hypercorn's HTTP/1.1 and h2 protocol layer, driven by the project's own connection
loop (runtime/_http_server.py) inside the worker's own nursery.

The shutdown coordinator, not hypercorn, decides when streams end: in phase 1 the listener stays open and
every new call is answered 503 with Retry-After (``Connection: close`` on HTTP/1.1); every h2 connection
gets a graceful GOAWAY and closes once its streams have ended; no HTTP/1.1 connection is closed under a
request that may be on the wire; phase 3 cancels the connection loop with the rest of the primary scope,
and no send can outlive that (see docs/http.md).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from functools import partial

import trio
from hypercorn.config import Config

from runtime import TransportBinding
from runtime._http_server import HttpServerLimits, effective_backlog, serve_http

from .._keepalive import enable_keepalive
from ._app import IngressApp


@dataclass(frozen=True, slots=True)
class HttpTransport:
    """Serve a worker's endpoints over HTTP/1.1 and h2 (cleartext prior knowledge or Upgrade)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_size: int = 1024 * 1024
    # Largest request head (request line and headers) hypercorn will buffer.
    max_header_size: int = 16 * 1024
    max_concurrent_streams: int = 100
    # Idle keep-alive connections are closed after this long.
    keep_alive_timeout: float = 5.0
    # Seconds of silence before the kernel probes a client (transports/_keepalive.py): a client that
    # vanished without closing is noticed, and its handlers cancelled, within about twice this. None: off.
    keepalive: float | None = 30.0
    # The whole request body must arrive within this long once its head has (a slow body would
    # otherwise hold its connection forever): past it, 408 and the connection closes.
    body_timeout: float = 30.0
    # Per-stream bound on queued SSE/NDJSON bytes before the handler feels back-pressure (in the
    # writer, and again in the h2 stream's buffer while the peer's flow-control window is closed).
    stream_high_water: int = 64 * 1024
    # h2: bound on response bytes queued over all streams of one connection.
    connection_high_water: int = 1024 * 1024
    # h2, at drain start: GOAWAY busy connections at once too, not when their last stream ends. Only for
    # clients that finish running streams after a GOAWAY (Envoy, Go, nghttp2, curl): httpx fails them.
    early_goaway: bool = False
    # Listen queue for bursts of new connections (capped by the kernel's net.core.somaxconn).
    backlog: int = 4096
    # TLS: with both set, the port speaks HTTPS only, and ALPN offers h2 then http/1.1.
    certfile: str | None = None
    keyfile: str | None = None
    # Mutual TLS: require a client certificate signed by this CA; its subject names the caller when no
    # token does (docs/security.md).
    client_ca: str | None = None
    name: str = "http"

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("TLS needs both certfile and keyfile (or neither, for cleartext)")
        if self.client_ca is not None and self.certfile is None:
            raise ValueError("client_ca (mutual TLS) needs certfile and keyfile too")
        if self.backlog < 1:
            raise ValueError(f"backlog must be at least 1, got {self.backlog}")

    def hypercorn_config(self) -> Config:
        """The protocol layer's settings (the connection loop's own are ``limits()``)."""
        config = Config()
        config.keep_alive_timeout = self.keep_alive_timeout
        config.h11_max_incomplete_size = self.max_header_size
        config.h2_max_concurrent_streams = self.max_concurrent_streams
        config.include_server_header = False
        config.accesslog = None  # the runtime logs one canonical line per request itself
        # A Logger, not hypercorn's default "-" (which gives it a plain-text stderr handler): its lines
        # propagate to the root handler configure_logging installs, so they follow --log-format/--log-level.
        config.errorlog = logging.getLogger("hypercorn.error")
        if self.certfile is not None:
            config.certfile, config.keyfile = self.certfile, self.keyfile
            config.alpn_protocols = ["h2", "http/1.1"]
            if self.client_ca is not None:
                config.ca_certs, config.verify_mode = self.client_ca, ssl.CERT_REQUIRED
        return config

    def limits(self) -> HttpServerLimits:
        return HttpServerLimits(
            self.backlog, self.stream_high_water, self.connection_high_water, self.early_goaway
        )

    def _prepare(self, stream: trio.SocketStream) -> None:
        if self.keepalive is not None:
            enable_keepalive(stream.socket, self.keepalive)

    async def serve(
        self,
        binding: TransportBinding,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled (phase 3); reports the bound (host, port)."""
        app = IngressApp(
            binding,
            max_body_size=self.max_body_size,
            body_timeout=self.body_timeout,
            stream_high_water=self.stream_high_water,
        )
        config, limits = self.hypercorn_config(), self.limits()
        serve = partial(
            serve_http,
            app,
            config,
            limits,
            self.host,
            self.port,
            prepare=self._prepare,
            draining=binding.intake_closed,
        )
        async with trio.open_nursery() as nursery:
            address: tuple[str, int] = await nursery.start(serve)
            binding.runtime.logger.info(
                "http.listening",
                address=f"{address[0]}:{address[1]}",
                backlog=effective_backlog(self.backlog),
            )
            task_status.started(address)
