"""Context managers that yield while background tasks run, without wrapping the body's own error.

With a plain nursery (or anything built on one, like ``trio_asyncio.open_loop()``), an exception raised
by the ``async with`` body comes out wrapped in ExceptionGroups (Trio's strict groups), so
``except RemoteError`` around a client block would never match. When the body's error is the only one,
it is re-raised as itself; anything else stays grouped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

import trio

T = TypeVar("T")


@asynccontextmanager
async def unwrap_body_error(manager: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """``async with manager``, re-raising an error of the body as itself when it is the only one."""
    body_error: BaseException | None = None
    try:
        async with manager as value:
            try:
                yield value
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as group:
        if body_error is not None and _only(group, body_error):
            raise body_error from None
        raise


def open_background_nursery() -> AbstractAsyncContextManager[trio.Nursery]:
    return unwrap_body_error(trio.open_nursery())


def _only(group: BaseException, error: BaseException) -> bool:
    """Whether ``group`` is ``error`` inside (nested) groups of one, as nurseries wrap it."""
    while group is not error and isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group is error
