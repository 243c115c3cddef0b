"""Contain hypercorn 0.18's per-connection failures so they cannot stop the whole server.

The bug: ``TCPServer._close()`` calls ``stream.send_eof()`` without ``send_lock``, and Trio's ``send_eof``
checkpoints while holding the stream's send-conflict detector. An h2 ``send_task`` that reaches
``protocol_send -> send_all`` in that window gets ``trio.BusyResourceError`` ("another task is currently
sending data on this SocketStream"); ``protocol_send`` only catches broken/closed errors, so it escapes the
connection's task group and ``serve()`` exits: every connection goes down, not one. h2 clients closing
connections mid-stream reproduce it.

Taking ``send_lock`` in ``_close`` would deadlock (``_close`` is reached from inside ``protocol_send``), so
instead, at our boundary:

- ``protocol_send`` treats ``BusyResourceError`` as what it means here: the connection is closing;
- any other exception of one connection is logged and ends that connection only.

``install()`` swaps the class that ``hypercorn.trio.run.worker_serve`` instantiates per connection. It is
idempotent and checked by tests against the installed hypercorn.
"""

from __future__ import annotations

import structlog
import trio
from hypercorn.events import Closed, Event
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import TCPServer


class ContainedTCPServer(TCPServer):
    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            # _close() holds the stream for send_eof: the connection is going away anyway.
            await self.protocol.handle(Closed())

    async def run(self) -> None:
        try:
            await super().run()
        except Exception as exc:  # one connection's failure, contained (Cancelled is not an Exception)
            structlog.get_logger("ingress").warning("http.connection_failed", exc_info=exc)


def install() -> None:
    """Make hypercorn's trio worker use ContainedTCPServer for every new connection."""
    hypercorn_run.TCPServer = ContainedTCPServer  # type: ignore[attr-defined]  # not re-exported, but is what worker_serve uses
