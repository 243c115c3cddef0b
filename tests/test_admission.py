"""Admission control: concurrency limit, bounded FIFO queue, deadlines, cancellation and shutdown."""

import pytest
import trio
import trio.testing

from runtime import Admission, ErrorCode, Rejected


async def _hold(
    admission: Admission, release: trio.Event, log: list[str], name: str, deadline: float = float("inf")
) -> None:
    try:
        async with admission.slot(deadline):
            log.append(f"start {name}")
            await release.wait()
    except Rejected as rejected:
        log.append(f"rejected {name} {rejected.reason}")


async def test_queue_is_fifo_and_bounded(autojump_clock):
    """Callers beyond the limit queue in order; a full queue rejects at once as overloaded (retryable)."""
    admission = Admission(max_concurrency=1, max_queue=2)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(_hold, admission, release, log, name)
            await trio.testing.wait_all_tasks_blocked()
        assert log == ["start a", "rejected d overloaded"]
        assert admission.statistics().queued == 2
        release.set()
    assert log[2:] == ["start b", "start c"]
    assert admission.statistics().running == 0


async def test_queued_caller_rejected_at_its_deadline(autojump_clock):
    """A queued caller waits exactly until its deadline, then is rejected with DEADLINE_EXCEEDED."""
    admission = Admission(max_concurrency=1, max_queue=4)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, admission, release, log, "a")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with pytest.raises(Rejected) as caught:
            async with admission.slot(start + 5):
                pass
        assert trio.current_time() - start == pytest.approx(5)
        assert caught.value.reason == "deadline"
        assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED
        release.set()


async def test_cancelled_waiter_frees_its_place_at_once(autojump_clock):
    """A caller cancelled while queued leaves the queue immediately; the next caller gets the slot."""
    admission = Admission(max_concurrency=1, max_queue=1)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, admission, release, log, "a")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: _cancel_later(scope))
            async with admission.slot():
                pytest.fail("should never get the slot")
        assert admission.statistics().queued == 0
        nursery.start_soon(_hold, admission, release, log, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["start a"]
        release.set()
    assert log == ["start a", "start b"]


async def _cancel_later(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def test_close_rejects_queued_and_later_callers_as_shutting_down(autojump_clock):
    """close() turns every queued caller away with retryable SHUTTING_DOWN, and every later caller too."""
    admission = Admission(max_concurrency=1, max_queue=5)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(_hold, admission, release, log, name)
            await trio.testing.wait_all_tasks_blocked()
        admission.close()
        await trio.testing.wait_all_tasks_blocked()
        # Woken together, so in any order (Trio randomizes it): both are turned away.
        assert log[0] == "start a"
        assert sorted(log[1:]) == ["rejected b shutting_down", "rejected c shutting_down"]
        with pytest.raises(Rejected) as caught:
            async with admission.slot():
                pass
        assert caught.value.code is ErrorCode.SHUTTING_DOWN and caught.value.retryable
        release.set()


def test_invalid_limits_are_refused():
    """Nonsense limits fail loudly at registration, not at the first request."""
    with pytest.raises(ValueError, match="max_concurrency"):
        Admission(max_concurrency=0)
    with pytest.raises(ValueError, match="max_queue"):
        Admission(max_queue=-1)
