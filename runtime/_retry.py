"""Retries on the calling side, one rule for every client (``NatsClient``, the pooled ``TcpPool``):
a retryable error that came before the first chunk is tried again, with backoff, while the client's
retry budget allows; once a chunk was delivered, nothing is ever retried (the caller would see output
twice). docs/operations.md "Clients that survive scale-in".
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TypeVar

import trio

from ._errors import IngressError

T = TypeVar("T")

# Tries per request (the first and three retries), with exponential backoff from FIRST_BACKOFF seconds.
MAX_ATTEMPTS = 4
FIRST_BACKOFF = 0.01


class RetryBudget:
    """Retries may be at most ``ratio`` of requests (plus a small ``reserve`` for a quiet client), so that
    when a whole fleet is failing, callers do not multiply its load (the Finagle / gRPC retry budget).
    ``requests`` and ``retries`` count what went through it (for a client's own metrics)."""

    def __init__(self, ratio: float = 0.2, reserve: float = 10.0) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._tokens = reserve
        self.requests = 0
        self.retries = 0

    def request_made(self) -> None:
        self.requests += 1
        self._tokens = min(self._tokens + self.ratio, self.reserve + 1)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False means retrying now would feed a stampede."""
        if self._tokens < 1:
            return False
        self._tokens -= 1
        self.retries += 1
        return True


async def retry_before_first_chunk(
    attempt: Callable[[int], AsyncGenerator[T, None]],
    budget: RetryBudget,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    first_backoff: float = FIRST_BACKOFF,
    worth_retrying: Callable[[IngressError], bool] = lambda error: bool(error.retryable),
) -> AsyncGenerator[T, None]:
    """Yield the chunks of ``attempt(0)``; if it raises a retryable ``IngressError`` before its first
    chunk, try ``attempt(1)``, and so on (the number lets a client pick another worker), while the
    budget allows. Any other error, and any error after a chunk, is raised as it is.
    ``worth_retrying`` lets a client keep a retryable error of its own for the caller (a pool that
    has already waited for a worker as long as it may)."""
    budget.request_made()
    for number in range(max_attempts):
        delivered = False
        try:
            chunks = attempt(number)
            async with aclosing(chunks):  # closed now, not by the garbage collector
                async for chunk in chunks:
                    delivered = True
                    yield chunk
            return
        except IngressError as error:
            last = number == max_attempts - 1
            if delivered or not worth_retrying(error) or last or not budget.try_spend():
                raise
        await trio.sleep(first_backoff * 2**number)
