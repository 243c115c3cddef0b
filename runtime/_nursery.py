"""A nursery for context managers that yield while background tasks run.

With a plain nursery, an exception raised by the ``async with`` body comes out wrapped in an
ExceptionGroup (Trio's strict groups), so ``except RemoteError`` around a client block would never
match. When the body's error is the only one, it is re-raised as itself; anything else stays grouped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_background_nursery() -> AsyncIterator[trio.Nursery]:
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as group:
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from None
        raise
