"""In-flight tracking: counts, the idle event, and the lost-wakeup race the Rust original had."""

import random

import trio
import trio.testing

from runtime import GlobalInFlight, InFlight


async def test_wait_idle_returns_at_once_when_idle():
    """A waiter on an idle tracker returns without blocking."""
    tracker = InFlight[object](GlobalInFlight())
    with trio.testing.assert_checkpoints():
        await tracker.wait_idle()


async def test_counts_and_statistics_follow_track_blocks():
    """track() counts while inside, decrements on exit even on error, and sums into the global tracker."""
    total = GlobalInFlight()
    a, b = InFlight[str](total), InFlight[str](total)
    with a.track("x"), b.track("y"):
        assert (a.count, b.count, total.count) == (1, 1, 2)
        assert a.active() == ["x"]
    try:
        with a.track("z"):
            raise RuntimeError
    except RuntimeError:
        pass
    assert total.statistics() == type(total.statistics())(in_flight=0, started=3, finished=3)


async def test_no_lost_wakeup_when_last_request_ends_before_waiter_parks():
    """The zero crossing between a waiter's check and its park cannot be missed (Rust Notify race)."""
    tracker = InFlight[int](GlobalInFlight())
    woke = trio.Event()
    done = trio.Event()

    async def request() -> None:
        with tracker.track(1):
            await done.wait()

    async def waiter() -> None:
        await tracker.wait_idle()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        # Schedule the waiter and the finishing request in the same tick: whichever runs first,
        # the waiter must wake.
        nursery.start_soon(waiter)
        done.set()
        with trio.fail_after(1):
            await woke.wait()
    assert tracker.count == 0


async def _one_interleaving(rng: random.Random) -> list[int]:
    total = GlobalInFlight()
    tracker = InFlight[int](total)
    seen: list[int] = []

    async def request(i: int, delay: float) -> None:
        with tracker.track(i):
            await trio.sleep(delay)

    async def waiter(delay: float) -> None:
        await trio.sleep(delay)
        await total.wait_idle()
        seen.append(total.count)

    async with trio.open_nursery() as nursery:
        for i in range(rng.randint(1, 8)):
            nursery.start_soon(request, i, rng.random() / 10)
        for _ in range(3):
            nursery.start_soon(waiter, rng.random() / 10)
    return seen


async def test_waiters_wake_across_many_interleavings(autojump_clock):
    """Under many random interleavings of enter/exit, every waiter returns, only when the count is zero."""
    rng = random.Random(7)
    for _ in range(50):
        assert await _one_interleaving(rng) == [0, 0, 0]
