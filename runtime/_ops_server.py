"""A small HTTP/1.1 listener for operators: ``/metrics`` (Prometheus text), ``/health`` and ``/ready``.

It serves workers that run without the HTTP transport (TCP or NATS only), so probes and scrapes work
everywhere. One request per connection, bounded in size and time: it never holds a task for a client
that dawdles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import h11
import structlog
import trio

from ._listeners import open_listeners, serve_accepting

# Probe and scrape requests are a few hundred bytes; anything larger is not one of ours.
MAX_REQUEST_BYTES = 16 * 1024
# A scraper that has not sent its request within this long is a stuck or hostile client.
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class OpsProbes:
    """What the ops listener reports: liveness is implicit (the process answers)."""

    is_ready: Callable[[], bool]
    render_metrics: Callable[[], bytes]


async def serve_ops(
    host: str,
    port: int,
    probes: OpsProbes,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ops endpoints on ``host:port`` until cancelled; reports the bound address."""
    listeners = await open_listeners(host, port)
    task_status.started(listeners[0].socket.getsockname()[:2])
    async with trio.open_nursery() as connections:
        await serve_accepting(
            partial(_serve_connection, probes),
            listeners,
            handler_nursery=connections,
            logger=structlog.get_logger("ingress"),
            listener_name="metrics",
        )


async def _serve_connection(probes: OpsProbes, stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            await _answer_one(probes, stream)
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        pass  # the client went away or spoke nonsense; nothing else depends on this connection
    finally:
        await trio.aclose_forcefully(stream)


async def _answer_one(probes: OpsProbes, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
            continue
        if isinstance(event, h11.Request):
            status, content_type, body = _route(probes, event.method, event.target)
            headers = [
                ("content-type", content_type),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        return


def _route(probes: OpsProbes, method: bytes, target: bytes) -> tuple[int, str, bytes]:
    path = target.split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return 405, "text/plain", b"only GET is served here\n"
    if path == b"/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", probes.render_metrics()
    if path == b"/health":
        return 200, "text/plain", b"ok\n"
    if path == b"/ready":
        ready = probes.is_ready()
        return (200 if ready else 503), "text/plain", b"ready\n" if ready else b"not ready: shutting down\n"
    return 404, "text/plain", b"not found: try /metrics, /health or /ready\n"
