"""The retry rule every client shares (runtime/_retry.py): retryable errors before the first chunk are
tried again, with backoff and within the budget; nothing is retried once a chunk was delivered."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest
import trio

from runtime import BadRequest, Overloaded, RetryBudget, Unavailable, retry_before_first_chunk


def test_retry_budget_allows_a_share_of_requests_plus_a_reserve():
    """Retries are capped at ratio x requests plus the reserve: a failing fleet is not stampeded."""
    budget = RetryBudget(ratio=0.25, reserve=2)
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # the reserve, then nothing
    for _ in range(8):
        budget.request_made()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # 8 requests x 0.25 = 2 retries
    assert (budget.requests, budget.retries) == (8, 4)


def _attempts(script: list[list[object]], tried: list[int]):
    """Attempt ``n`` yields the items of ``script[n]``, raising those that are errors."""

    async def attempt(number: int) -> AsyncGenerator[object, None]:
        tried.append(number)
        for item in script[number]:
            if isinstance(item, Exception):
                raise item
            yield item

    return attempt


async def _collect(chunks: AsyncGenerator[object, None], into: list[object]) -> None:
    async for chunk in chunks:
        into.append(chunk)


async def test_a_retryable_error_before_the_first_chunk_is_tried_again_with_backoff(autojump_clock):
    """Two refusals, then an answer: the caller sees the answer only, after 10 + 20 ms of backoff."""
    tried: list[int] = []
    script = [[Unavailable("draining", retryable=True)], [Overloaded("full", retryable=True)], ["a", "b"]]
    got: list[object] = []
    start = trio.current_time()
    await _collect(retry_before_first_chunk(_attempts(script, tried), RetryBudget()), got)
    assert got == ["a", "b"] and tried == [0, 1, 2]
    assert trio.current_time() - start == pytest.approx(0.03)


@pytest.mark.parametrize(
    ("script", "tries"),
    [
        ([["a", Unavailable("lost mid-stream", retryable=True)]], 1),  # after a chunk: never again
        ([[BadRequest("no")]], 1),  # not retryable
        ([[Unavailable("x", retryable=True)]] * 4, 4),  # the last attempt's error is the caller's
    ],
)
async def test_errors_after_a_chunk_or_not_retryable_or_after_the_last_attempt_are_raised(
    script, tries, autojump_clock
):
    """What may not be retried reaches the caller as it is, and the chunks before it were delivered."""
    tried: list[int] = []
    got: list[object] = []
    with pytest.raises(type(script[-1][-1])):
        await _collect(retry_before_first_chunk(_attempts(script, tried), RetryBudget()), got)
    assert len(tried) == tries and got == [c for c in script[0] if isinstance(c, str)]


async def test_an_empty_budget_raises_the_first_retryable_error():
    """With no retry left in the budget the first refusal is the answer: callers do not stampede."""
    tried: list[int] = []
    budget = RetryBudget(ratio=0, reserve=0)
    with pytest.raises(Unavailable):
        await _collect(
            retry_before_first_chunk(_attempts([[Unavailable("x", retryable=True)], ["a"]], tried), budget),
            [],
        )
    assert tried == [0] and budget.retries == 0
