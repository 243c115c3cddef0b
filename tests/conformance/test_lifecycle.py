"""The contract, part 2: a request's life while it runs. What reaches the handler (deadline, metadata,
request id), admission, deadlines, inactivity, and the caller's stop, kill and disconnect."""

from __future__ import annotations

import pytest
import trio

from .app import STALL_TIMEOUT
from .drivers import samples
from .helpers import TEST_TIMEOUT, chunks, outcomes, total

# A stream long enough that reaching its end means a stop was ignored.
LONG = 10_000

NATS_NO_CONTROL_YET = (
    "a NATS caller learns where to send KILL from the first reply (Ingress-Control, "
    "docs/protocol-nats.md): before it, it can only drop its inbox and wait for the worker's probe"
)


async def test_deadline_metadata_and_request_id_reach_the_handler(driver):
    """The caller's timeout (5 s) becomes a finite deadline no later than that; metadata and the request
    id arrive intact, except a credential, which never reaches the handler (docs/security.md)."""
    metadata = {"x-trace": "t-1", "x-tenant": "acme"}
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call(
            "context", {}, timeout_ms=5000, request_id="rid-conformance-1", metadata=metadata
        )
    assert reply.ok
    [seen] = reply.chunks
    assert seen["remaining"] is not None and 0 < seen["remaining"] <= 5
    assert seen["id"] == "rid-conformance-1"
    assert metadata.items() <= seen["metadata"].items()  # HTTP passes every request header on
    credential = await driver.call("context", {}, metadata={"authorization": "Bearer t0k", **metadata})
    assert "authorization" not in {key.lower() for key in credential.chunks[0]["metadata"]}


async def test_no_deadline_when_the_caller_sets_none(driver):
    """A call without a timeout runs without a deadline, and gets a request id made up for it."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("context", {})
    assert reply.ok
    assert reply.chunks[0]["remaining"] is None and reply.chunks[0]["id"]


async def test_admission_runs_one_and_refuses_the_next_overloaded(driver, probe):
    """With max_concurrency=1 and no queue, a second call while one runs is refused OVERLOADED,
    retryable, without running; the first completes. Counted as a rejection (overloaded)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("limited", {}) as running:
            await probe.held.wait()
            refused = await driver.call("limited", {})
            assert len(probe.contexts) == 1  # the refused call never reached the handler
            probe.release.set()
            first = await running.finish()
        await driver.idle("limited")
    assert refused.code == "OVERLOADED" and refused.retryable is True and refused.chunks == []
    assert first.ok and first.chunks == ["done"]
    assert outcomes(driver, "limited") == {"ok": 1, "rejected": 1}
    rejections = samples(driver.handle, "ingress_rejections_total", driver.transport, "endpoint", "reason")
    assert rejections == {("limited", "overloaded"): 1}


async def test_short_deadline_on_a_held_handler_is_deadline_exceeded(driver, probe):
    """A caller deadline that passes while the handler waits cancels it: DEADLINE_EXCEEDED, not
    retryable, outcome error."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("tokens", {"n": 3, "hold_at": 0}, timeout_ms=200)
        await driver.idle("tokens")
    assert reply.code == "DEADLINE_EXCEEDED" and reply.retryable is False and reply.chunks == []
    assert probe.cancelled.is_set()
    assert outcomes(driver, "tokens") == {"error": 1}


async def test_inactivity_timeout_ends_a_stalled_stream(driver, probe):
    """A stream silent for longer than inactivity_timeout ends with DEADLINE_EXCEEDED after the chunks
    it sent; counted as an inactivity timeout."""
    with trio.fail_after(TEST_TIMEOUT):
        start = trio.current_time()
        reply = await driver.call("stalling", {})
        await driver.idle("stalling")
    assert trio.current_time() - start >= STALL_TIMEOUT
    assert reply.chunks == chunks(1) and reply.code == "DEADLINE_EXCEEDED" and reply.retryable is False
    assert "inactivity_timeout" in reply.message
    assert probe.cancelled.is_set()
    assert total(driver, "ingress_inactivity_timeouts_total", "stalling") == 1
    assert outcomes(driver, "stalling") == {"error": 1}


@pytest.mark.parametrize("hold_at", [0, 1], ids=["before-any-chunk", "after-a-chunk"])
async def test_disconnect_cancels_the_handler_and_is_counted(driver, probe, hold_at):
    """A caller that goes away while its stream runs (connection closed, inbox dropped) has its handler
    cancelled; the request ends disconnected, counted once in ingress_client_disconnects_total under the
    transport's reason."""
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("tokens", {"n": 3, "hold_at": hold_at}) as call:
            assert [await call.next_chunk() for _ in range(hold_at)] == chunks(hold_at)
            await probe.held.wait()
            await call.disconnect()
            await probe.cancelled.wait()
        await driver.idle("tokens")
    assert outcomes(driver, "tokens") == {"disconnected": 1}
    disconnects = samples(driver.handle, "ingress_client_disconnects_total", driver.transport, "reason")
    assert disconnects == {(driver.disconnect_reason,): 1}


async def test_stop_ends_a_stream_gracefully(driver, probe):
    """A stop ends the stream early with a clean end: the chunks so far, in order, no error; the handler
    is closed, not cancelled."""
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("tokens", {"n": LONG, "hold_at": 2}) as call:
            assert [await call.next_chunk() for _ in range(2)] == chunks(2)
            await probe.held.wait()
            await call.stop()
            probe.release.set()
            reply = await call.finish()
        await driver.idle("tokens")
    assert reply.ok and 2 < len(reply.chunks) < LONG and reply.chunks == chunks(len(reply.chunks))
    assert probe.closed.is_set() and not probe.cancelled.is_set()
    assert outcomes(driver, "tokens") == {"ok": 1}


@pytest.mark.parametrize("hold_at", [0, 1], ids=["before-any-chunk", "after-a-chunk"])
async def test_kill_ends_a_stream_with_cancelled(driver, probe, request, hold_at):
    """A kill cancels the handler at once; the caller gets the chunks so far, then CANCELLED (not
    retryable); the outcome is cancelled."""
    if hold_at == 0 and driver.name == "nats":
        request.applymarker(pytest.mark.xfail(strict=True, reason=NATS_NO_CONTROL_YET))
    with trio.fail_after(TEST_TIMEOUT):
        async with driver.open("tokens", {"n": 3, "hold_at": hold_at}) as call:
            assert [await call.next_chunk() for _ in range(hold_at)] == chunks(hold_at)
            await probe.held.wait()
            await call.kill()
            reply = await call.finish()
        await driver.idle("tokens")
    assert reply.chunks == chunks(hold_at) and reply.code == "CANCELLED" and reply.retryable is False
    assert probe.cancelled.is_set()
    assert outcomes(driver, "tokens") == {"cancelled": 1}
