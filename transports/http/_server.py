"""The HTTP transport: hypercorn's trio worker inside the worker's own nursery.

The shutdown coordinator, not hypercorn, decides when streams end. hypercorn's own shutdown is never
triggered (it would reset connections in the accept backlog and close fresh ones unanswered: see
_hypercorn_patch): in phase 1 the listener stays open, every new call is answered 503 with Retry-After,
idle keep-alive connections are closed; phase 3 cancels hypercorn with the rest of the primary scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from runtime import TransportBinding

from . import _hypercorn_patch
from ._app import IngressApp

# hypercorn's own drain deadline, out of the coordinator's way (it is never triggered; phase 3 stops it).
_NEVER = 10.0 * 365 * 24 * 3600


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
    # Per-stream bound on queued SSE/NDJSON bytes before the handler feels back-pressure.
    stream_high_water: int = 64 * 1024
    # TLS: with both set, the port speaks HTTPS only, and ALPN offers h2 then http/1.1.
    certfile: str | None = None
    keyfile: str | None = None
    name: str = "http"

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("TLS needs both certfile and keyfile (or neither, for cleartext)")

    def hypercorn_config(self, draining: trio.Event) -> Config:
        config = Config()
        # Read by ContainedTCPServer (to close idle keep-alive connections when draining, and to turn
        # on TCP keepalive); Config has no slot for them.
        config.ingress_draining = draining  # type: ignore[attr-defined]
        config.ingress_keepalive = self.keepalive  # type: ignore[attr-defined]
        config.bind = [f"{self.host}:{self.port}"]
        config.graceful_timeout = _NEVER
        config.keep_alive_timeout = self.keep_alive_timeout
        config.h11_max_incomplete_size = self.max_header_size
        config.h2_max_concurrent_streams = self.max_concurrent_streams
        config.include_server_header = False
        config.accesslog = None  # the runtime logs one canonical line per request itself
        if self.certfile is not None:
            config.certfile, config.keyfile = self.certfile, self.keyfile
            config.alpn_protocols = ["h2", "http/1.1"]
        return config

    async def serve(
        self,
        binding: TransportBinding,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled (phase 3); reports the bound (host, port)."""
        _hypercorn_patch.install()
        app = IngressApp(
            binding,
            max_body_size=self.max_body_size,
            body_timeout=self.body_timeout,
            stream_high_water=self.stream_high_water,
        )
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                lambda task_status: serve(
                    app,  # type: ignore[arg-type]  # hypercorn's Framework union is narrower than ASGI's shape
                    self.hypercorn_config(binding.intake_closed),
                    task_status=task_status,
                )
            )
            bound = urlsplit(binds[0])
            address = (bound.hostname or self.host, bound.port or self.port)
            binding.runtime.logger.info("http.listening", address=f"{address[0]}:{address[1]}")
            task_status.started(address)
