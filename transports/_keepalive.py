"""TCP keepalive for connections that must notice a peer that vanished without a word (the TCP and
HTTP transports, and TcpClient).

A peer whose host died or whose network was cut sends no FIN and no RST: without probes, a connection
with nothing to send waits forever, and so does a handler whose caller is gone (a long unary request
holding a model slot, say). With keepalive the kernel probes a silent peer after ``idle`` seconds, then
every ``idle / 3``; three unanswered probes reset the connection, so the reader sees it and the
connection's handlers are cancelled within about twice ``idle``. It costs nothing while data flows.

``TCP_USER_TIMEOUT`` (which would also bound unacknowledged data) is deliberately not set: on a peer
that is alive but reading slowly it can fire while the send window is closed, which is back-pressure,
not death.
"""

from __future__ import annotations

import socket

import trio

PROBES = 3


def enable_keepalive(sock: trio.socket.SocketType, idle: float) -> None:
    """Turn on keepalive probing of ``sock`` after ``idle`` seconds of silence (where the OS allows
    the timings to be set; elsewhere its defaults apply)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    timings = (
        (getattr(socket, "TCP_KEEPIDLE", None), max(1, round(idle))),
        (getattr(socket, "TCP_KEEPINTVL", None), max(1, round(idle / PROBES))),
        (getattr(socket, "TCP_KEEPCNT", None), PROBES),
    )
    for option, value in timings:
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
