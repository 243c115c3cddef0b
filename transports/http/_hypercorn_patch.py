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

Draining is ours, not hypercorn's (scripts/chaos_http.py showed why): hypercorn's own shutdown closes its
listener, which resets connections still in the kernel's accept backlog, and its idle task then closes
every idle connection, including one just accepted whose request is already in the socket, unread.
Either way a caller gets no response at all and cannot know whether its request ran. So the HTTP
transport never triggers hypercorn's shutdown: the listener stays open until phase 3 and every new call is
answered 503 by the app. This class closes idle keep-alive connections when the worker's intake closes
(``Config.ingress_draining``, set by the transport), and only those that have served a request before
and have no request already waiting in the socket (a peek); a fresh connection keeps its
``keep_alive_timeout`` to send its first request, which is then answered explicitly.

``install()`` swaps the class that ``hypercorn.trio.run.worker_serve`` instantiates per connection. It is
idempotent and checked by tests against the installed hypercorn.
"""

from __future__ import annotations

import socket

import structlog
import trio
from hypercorn.events import Closed, Event, Updated
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import TCPServer

from .._keepalive import enable_keepalive

# Bound on closing an idle connection (it runs shielded, so it must end by itself).
CLOSE_TIMEOUT = 5.0


class ContainedTCPServer(TCPServer):
    _served_a_request = False

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated) and not event.idle:
            self._served_a_request = True
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            # _close() holds the stream for send_eof: the connection is going away anyway.
            await self.protocol.handle(Closed())

    async def _idle_timeout(self) -> None:
        draining: trio.Event | None = getattr(self.config, "ingress_draining", None)
        with trio.move_on_after(self.config.keep_alive_timeout):
            if self._served_a_request and draining is not None:
                await draining.wait()
            else:
                await trio.sleep_forever()  # a fresh connection's first request is always answered
        if draining is not None and draining.is_set() and self._request_waiting():
            return  # read and answered explicitly; the idle task runs again after that answer
        # hypercorn shields this without a bound; a close that cannot finish must not pin the task.
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await self._initiate_server_close()

    def _request_waiting(self) -> bool:
        sock = getattr(self.stream, "socket", None)  # TLS streams have none here: close as before
        if sock is None:
            return False
        # A stdlib socket on the same descriptor, detached afterwards so it never closes it.
        peek = socket.socket(fileno=sock.fileno())
        try:
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (EAGAIN) or the peer is gone
            return False
        finally:
            peek.detach()

    async def run(self) -> None:
        keepalive: float | None = getattr(self.config, "ingress_keepalive", None)
        # TLS wraps the socket stream: the socket is one level down.
        sock = getattr(getattr(self.stream, "transport_stream", self.stream), "socket", None)
        if keepalive is not None and sock is not None:
            enable_keepalive(sock, keepalive)
        try:
            await super().run()
        except Exception as exc:  # one connection's failure, contained (Cancelled is not an Exception)
            structlog.get_logger("ingress").warning("http.connection_failed", exc_info=exc)


def install() -> None:
    """Make hypercorn's trio worker use ContainedTCPServer for every new connection."""
    hypercorn_run.TCPServer = ContainedTCPServer  # type: ignore[attr-defined]  # not re-exported, but is what worker_serve uses
