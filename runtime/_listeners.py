"""Listening sockets and their accept loops, shared by every listener the worker opens.

Two things differ from ``trio.serve_listeners``, both for production:

- **The backlog is a setting with a production default.** A burst of new connections (a router
  reconnecting after a restart, an autoscaler shifting load) overflows a small accept queue into SYN
  retransmits that cost clients seconds.
- **Running out of file descriptors is one warning, not a traceback every 100 ms.** trio logs every
  failed ``accept`` with its traceback; past the descriptor limit that is ten tracebacks a second while
  the worker keeps serving the connections it has. Here the loop waits and tries again, and says so at
  most once per ``CAPACITY_WARNING_INTERVAL`` with the number of failures since the last warning.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

# Connections the kernel may queue before the worker accepts them (capped by net.core.somaxconn).
DEFAULT_BACKLOG = 4096
# accept() errors that mean "out of resources right now", not "this listener is broken" (as trio's).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# How long to wait before accepting again once out of descriptors: long enough not to spin, short
# enough that the backlog keeps moving as soon as connections close.
CAPACITY_RETRY_DELAY = 0.1
# At most one warning per this many seconds while accept keeps failing for lack of resources.
CAPACITY_WARNING_INTERVAL = 10.0


async def open_listeners(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> list[trio.SocketListener]:
    """Listening sockets for ``host:port`` (one per address family the host resolves to). A failure
    names the address: "Address already in use" alone does not say which of a worker's ports."""
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def serve_accepting(
    handler: Callable[[Any], Awaitable[object]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    handler_nursery: trio.Nursery,
    logger: Any,
    listener_name: str,
) -> None:
    """Accept on every listener until cancelled, starting ``handler(stream)`` in ``handler_nursery``."""
    warning = _CapacityWarning(logger, listener_name)
    async with trio.open_nursery() as accepting:
        for listener in listeners:
            accepting.start_soon(_accept_forever, listener, handler, handler_nursery, warning)


async def _accept_forever(
    listener: trio.abc.Listener[Any],
    handler: Callable[[Any], Awaitable[object]],
    handler_nursery: trio.Nursery,
    warning: _CapacityWarning,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            warning.failed(exc)
            await trio.sleep(CAPACITY_RETRY_DELAY)
            continue
        handler_nursery.start_soon(handler, stream)


class _CapacityWarning:
    """Logs ``listener.accept_failing`` at most once per interval, with how many failures it covers."""

    def __init__(self, logger: Any, listener_name: str) -> None:
        self._logger = logger
        self._listener = listener_name
        self._last_warning = -math.inf
        self._failures = 0

    def failed(self, exc: OSError) -> None:
        self._failures += 1
        now = trio.current_time()
        if now - self._last_warning < CAPACITY_WARNING_INTERVAL:
            return
        self._logger.warning(
            "listener.accept_failing",
            listener=self._listener,
            error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            failures=self._failures,
            retry_in=CAPACITY_RETRY_DELAY,
        )
        self._last_warning = now
        self._failures = 0
