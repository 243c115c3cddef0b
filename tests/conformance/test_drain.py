"""The contract, part 3: the drain. What runs when shutdown starts completes, what comes after is
refused as safe to retry, and what is still running at the drain deadline is told SHUTTING_DOWN."""

from __future__ import annotations

import pytest
import trio

from .helpers import TEST_TIMEOUT, chunks, outcomes


async def test_drain_completes_the_running_request_and_refuses_new_ones(driver, probe):
    """A stream running when shutdown starts runs to its clean end; a call after intake closed is
    refused UNAVAILABLE, retryable, without reaching a handler; the drain is not forced."""
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("tokens", {"n": 3, "hold_at": 1}) as running:
            assert await running.next_chunk() == {"i": 0}
            await probe.held.wait()
            driver.handle.shutdown("conformance")
            await driver.handle.wait_intake_closed()
            refused = await driver.call("echo", {"late": True})
            probe.release.set()
            reply = await running.finish()
        result = await driver.handle.wait_drained()
    assert refused.code == "UNAVAILABLE" and refused.retryable is True and refused.chunks == []
    assert reply.ok and reply.chunks == chunks(3)
    assert not result.forced
    assert outcomes(driver, "echo") == {}  # refused at the door: never accepted, never run
    assert outcomes(driver, "tokens") == {"ok": 1}


@pytest.mark.worker_config(drain_timeout=0.3)
@pytest.mark.parametrize(
    ("hold_at", "retryable"), [(0, True), (1, False)], ids=["before-any-chunk", "after-a-chunk"]
)
async def test_forced_drain_tells_the_caller_shutting_down(driver, probe, hold_at, retryable):
    """A request still running at the drain deadline is killed: its caller gets the chunks so far, then
    SHUTTING_DOWN, retryable only if no chunk had been sent; the outcome is shutdown, the drain forced."""
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("tokens", {"n": 3, "hold_at": hold_at}) as running:
            assert [await running.next_chunk() for _ in range(hold_at)] == chunks(hold_at)
            await probe.held.wait()
            driver.handle.shutdown("conformance")
            reply = await running.finish()
        result = await driver.handle.wait_drained()
    assert reply.chunks == chunks(hold_at)
    assert reply.code == "SHUTTING_DOWN" and reply.retryable is retryable
    assert probe.cancelled.is_set()
    assert result.forced and result.killed == 1
    assert outcomes(driver, "tokens") == {"shutdown": 1}


async def test_a_caller_can_still_kill_its_request_while_the_worker_drains(driver, probe):
    """Intake is closed, not the caller's controls: a kill during the drain cancels the request
    (CANCELLED after its chunks) and the drain then ends without forcing anything."""
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("tokens", {"n": 3, "hold_at": 1}) as running:
            assert await running.next_chunk() == {"i": 0}
            await probe.held.wait()
            driver.handle.shutdown("conformance")
            await driver.handle.wait_intake_closed()
            await running.kill()
            reply = await running.finish()
        result = await driver.handle.wait_drained()
    assert reply.chunks == chunks(1) and reply.code == "CANCELLED" and reply.retryable is False
    assert probe.cancelled.is_set() and not result.forced
    assert outcomes(driver, "tokens") == {"cancelled": 1}
