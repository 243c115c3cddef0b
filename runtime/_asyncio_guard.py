"""A guard on every asyncio loop the runtime opens, against a CPython bug any asyncio transport on it
can hit (nats-py's among them).

On CPython 3.12 and 3.13 before the fix (python/cpython#136234, fixed upstream in 2025 but not in the
3.12.1 and 3.13.0 this project supports), ``_SelectorSocketTransport.writelines`` lacks the
lost-connection check that ``write`` has. Called after the connection was lost (``abort()``, a reset
seen by the reader) and before the transport has closed its socket, it registers a writer for that
socket. Under trio-asyncio the writer is a task that waits on the file descriptor; once the socket is
closed trio's epoll raises EBADF there, and the error ends the whole loop: every NATS connection and
asyncio engine of the worker with it (or a ``NatsClient``'s, mid-run). nats-py's flusher calls
``writelines`` whenever a server goes away under load, so a NATS server killed under a busy worker or
client did this now and then.

A writer registered for a transport whose connection is lost can never write anything (its callback
returns at once; ``write`` would have dropped the data), so the guard drops the registration, which is
what the upstream fix amounts to. Remove it once every supported Python carries the fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def drop_writers_for_lost_connections(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` ignore a writer that a transport registers after its connection was lost."""
    add_writer: Callable[..., Any] = loop._add_writer  # type: ignore[attr-defined]

    def _add_writer(fd: Any, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        transport = getattr(callback, "__self__", None)
        # _conn_lost: CPython's own count of the transport's connection losses (0 while it is up).
        lost = isinstance(transport, asyncio.Transport) and getattr(transport, "_conn_lost", False)
        if lost:
            return None
        return add_writer(fd, callback, *args, **kwargs)

    loop._add_writer = _add_writer  # type: ignore[attr-defined]
