"""The operators' routes: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics`` (Prometheus) and
``/status`` (the worker's live state as JSON, runtime/_status.py).

``OpsApp`` is one small ASGI app that serves them with the libraries that already do it right:
prometheus_client's ASGI exposition (OpenMetrics or text by the ``Accept`` header, gzip by
``Accept-Encoding``, ``name[]`` filtering) and hypercorn's protocol layer for HTTP itself (HEAD answered
without a body, malformed requests refused with 400 by the parser, never by us). The HTTP transport
mounts the same app on its own port; ``serve_ops`` (``--metrics HOST:PORT``) runs it alone, for
workers without the HTTP transport, through the same connection loop (``runtime/_http_server.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio
from hypercorn.config import Config
from prometheus_client import CollectorRegistry, make_asgi_app

from ._auth import ANONYMOUS, authorize, credentials_from
from ._config import WorkerConfig
from ._errors import ErrorCode, IngressError, PermissionDenied, Unauthenticated
from ._http_server import HttpServerLimits, serve_http
from ._readiness import Readiness

OPS_PATHS = frozenset({"/health", "/ready", "/metrics", "/status"})
WWW_AUTHENTICATE = b'Bearer realm="trio-ingress"'
_ALLOWED = b"GET, HEAD"
# The ops port sees a scraper and two probes: a small backlog and a short idle time are plenty.
OPS_LIMITS = HttpServerLimits(backlog=128)
# A probe or scrape request head is a few hundred bytes; anything larger is not one of ours.
MAX_REQUEST_HEAD = 16 * 1024
# A scraper that has not sent its (next) request within this long is closed.
IDLE_TIMEOUT = 10.0


class OpsApp:
    """ASGI app for the ops routes; ``readiness`` is read per request, the registry at scrape time."""

    def __init__(
        self,
        readiness: Readiness,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]] | None = None,
        config: WorkerConfig | None = None,
    ) -> None:
        self._readiness = readiness
        self._metrics = make_asgi_app(registry)
        self._status = status
        # With config.metrics_scope, /metrics wants a credential granting it (docs/security.md).
        self._config = config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # a WebSocket upgrade: hypercorn refuses it once the app returns
        path, method = scope["path"], scope["method"]
        if path not in OPS_PATHS or (path == "/status" and self._status is None):
            await _text(send, 404, b"not found: try /metrics, /health, /ready or /status\n")
        elif method not in ("GET", "HEAD"):
            await _text(send, 405, b"only GET and HEAD are served here\n", [(b"allow", _ALLOWED)])
        elif path == "/metrics":
            refusal = _metrics_refusal_for(self._config, scope)
            if refusal is None:
                await self._metrics(scope, receive, send)
            else:
                extra = (
                    [(b"www-authenticate", WWW_AUTHENTICATE)]
                    if refusal.code is ErrorCode.UNAUTHENTICATED
                    else []
                )
                await _text(send, 401 if extra else 403, refusal.message.encode() + b"\n", extra)
        elif path == "/health":
            await _text(send, 200, b"ok\n")
        elif path == "/status":
            assert self._status is not None
            body = json.dumps(self._status(), separators=(",", ":")).encode() + b"\n"
            await _text(send, 200, body, content_type=b"application/json")
        elif self._readiness.ready:
            await _text(send, 200, b"ready\n")
        else:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(self._readiness.reasons().items()))
            await _text(send, 503, f"not ready: {why}\n".encode())


def _metrics_refusal_for(config: WorkerConfig | None, scope: dict[str, Any]) -> IngressError | None:
    if config is None or config.metrics_scope is None:
        return None
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    credentials, _ = credentials_from(headers)
    try:
        principal = (
            ANONYMOUS if config.authenticator is None else config.authenticator.authenticate(credentials)
        )
        authorize(principal, "/metrics", frozenset({config.metrics_scope}))
    except (Unauthenticated, PermissionDenied) as refusal:
        return refusal
    except Exception:  # a bug in a user's check: refuse, never serve (the traceback has no locals)
        logging.getLogger(__name__).exception("auth.check_failed on /metrics")
        return Unauthenticated("the worker could not check the credential")
    return None


async def _text(
    send: Any,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


def ops_config() -> Config:
    config = Config()
    config.keep_alive_timeout = IDLE_TIMEOUT
    config.h11_max_incomplete_size = MAX_REQUEST_HEAD
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through configure_logging's root handler
    return config


async def serve_ops(
    host: str,
    port: int,
    app: OpsApp,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ops routes on ``host:port`` until cancelled; reports the bound address."""
    await serve_http(
        app, ops_config(), OPS_LIMITS, host, port, listener_name="metrics", task_status=task_status
    )
