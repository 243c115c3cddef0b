"""Three-phase shutdown on the mock clock: every phase, every timeout path, the second request, exit codes."""

import os
import signal

import pytest
import trio
import trio.lowlevel
import trio.testing
from structlog.testing import capture_logs

from runtime import EXIT_DRAIN_FORCED, EXIT_OK, ErrorCode, Worker, WorkerConfig, open_worker
from runtime.testing import MemoryTransport, sample


def _worker() -> Worker:
    worker = Worker("t")

    @worker.endpoint("tokens")
    async def tokens(request, ctx):
        for i in range(request["n"]):
            await trio.sleep(1)
            yield i

    @worker.endpoint("stubborn")
    async def stubborn(request, ctx):
        # Ignores cancellation for a while, like a handler stuck in a shielded cleanup.
        with trio.CancelScope(shield=True):
            await trio.sleep(request["hold"])
        return "late"

    return worker


async def _serve(config: WorkerConfig, transport: MemoryTransport, nursery: trio.Nursery):
    return await nursery.start(
        lambda task_status: _worker().serve(
            [transport], config, handle_signals=False, task_status=task_status
        )
    )


async def test_clean_drain_finishes_streams_and_exits_zero(autojump_clock):
    """Streams in flight at SIGTERM run to the end; phase 3 follows at once; exit code 0."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(drain_timeout=30), transport, nursery)
        _, first = transport.start_request("tokens", {"n": 5})
        _, second = transport.start_request("tokens", {"n": 3})
        await trio.sleep(0.5)
        start = trio.current_time()
        with capture_logs() as logs:
            handle.shutdown("test")
            assert not handle.ready
            await handle.wait_drained()
    assert trio.current_time() - start == pytest.approx(4.5)
    assert first.chunks == [0, 1, 2, 3, 4] and second.chunks == [0, 1, 2]
    assert first.ended and second.ended
    assert handle.exit_code == EXIT_OK
    events = [entry["event"] for entry in logs]
    for expected in (
        "shutdown.phase0.done",
        "shutdown.intake_closed",
        "shutdown.endpoint_drained",
        "shutdown.phase1.done",
        "shutdown.phase2.done",
        "shutdown.phase3.started",
    ):
        assert expected in events
    drained = [e for e in logs if e["event"] == "shutdown.endpoint_drained" and e["endpoint"] == "tokens"]
    assert drained[0]["transport"] == "memory" and drained[0]["elapsed"] == pytest.approx(4.5)


async def test_request_accepted_in_the_same_tick_as_the_signal_is_not_lost(autojump_clock):
    """A request accepted just before shutdown, whose task has not started yet, is still drained."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(), transport, nursery)
        _, sink = transport.start_request("tokens", {"n": 2})
        # Counted the moment it is accepted, before its task runs: the drain cannot miss it.
        assert handle.statistics().in_flight == 1
        handle.shutdown("test")  # no checkpoint in between: the request task has not run yet
        result = await handle.wait_drained()
    assert handle.statistics().started == 1 and handle.statistics().in_flight == 0
    # Depending on which task Trio runs first, the request was served, or reached admission after
    # phase 1 closed it and was refused explicitly, as retryable. Never silence.
    if sink.error is None:
        assert sink.ended and sink.chunks == [0, 1]
    else:
        assert sink.error.code is ErrorCode.SHUTTING_DOWN and sink.retryable
    assert not result.forced


async def test_drain_timeout_kills_stragglers_tells_callers_and_exits_forced(autojump_clock):
    """At drain_timeout, requests still running are killed with SHUTTING_DOWN and the exit code is forced."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(drain_timeout=5), transport, nursery)
        _, quiet = transport.start_request("tokens", {"n": 0})
        _, long = transport.start_request("tokens", {"n": 100})
        await trio.sleep(0.5)
        start = trio.current_time()
        handle.shutdown("test")
    assert trio.current_time() - start == pytest.approx(5)
    assert long.error is not None and long.error.code is ErrorCode.SHUTTING_DOWN
    assert long.chunks == [0, 1, 2, 3, 4] and long.retryable is False
    assert quiet.ended
    assert handle.exit_code == EXIT_DRAIN_FORCED and handle.result.killed == 1
    assert sample(handle.runtime, "ingress_shutdown_drain_forced") == 1
    assert (
        sample(
            handle.runtime,
            "ingress_requests_total",
            endpoint="tokens",
            transport="memory",
            outcome="shutdown",
        )
        == 1
    )


async def test_second_request_skips_the_drain(autojump_clock):
    """A second signal while draining kills what is running at once and exits with the forced code."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(drain_timeout=30), transport, nursery)
        _, sink = transport.start_request("tokens", {"n": 100})
        await trio.sleep(0.5)
        start = trio.current_time()
        handle.shutdown("first")
        await trio.sleep(2)
        handle.shutdown("second")
    assert trio.current_time() - start == pytest.approx(2)
    assert sink.error is not None and sink.error.code is ErrorCode.SHUTTING_DOWN
    assert handle.exit_code == EXIT_DRAIN_FORCED


async def test_shutdown_delay_keeps_serving_with_readiness_false(autojump_clock):
    """During shutdown_delay, readiness is false but new requests are still served; then intake closes."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(shutdown_delay=3), transport, nursery)
        assert handle.ready
        start = trio.current_time()
        handle.shutdown("test")
        assert not handle.ready
        await trio.sleep(2.9)
        _, during = transport.start_request("tokens", {"n": 1})
        await trio.sleep(0.2)
        _, after = transport.start_request("tokens", {"n": 1})
    assert during.ended and during.chunks == [0]
    assert after.error is not None and after.error.code is ErrorCode.UNAVAILABLE
    assert trio.current_time() - start == pytest.approx(3.9)
    assert handle.exit_code == EXIT_OK


async def test_shutdown_delay_longer_than_drain_timeout_is_cut(autojump_clock):
    """The drain deadline, fixed at the signal, bounds phase 0 too."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(shutdown_delay=60, drain_timeout=10), transport, nursery)
        start = trio.current_time()
        handle.shutdown("test")
    assert trio.current_time() - start == pytest.approx(10)
    assert handle.exit_code == EXIT_OK  # nothing had to be killed


async def test_kill_grace_bounds_a_handler_that_ignores_cancellation(autojump_clock):
    """A handler that shields itself from the kill still cannot hold phase 3 past kill_grace."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(drain_timeout=2, kill_grace=1), transport, nursery)
        transport.start_request("stubborn", {"hold": 100})
        await trio.lowlevel.checkpoint()
        start = trio.current_time()
        handle.shutdown("test")
        await handle.wait_drained()
        assert trio.current_time() - start == pytest.approx(3)
        nursery.cancel_scope.cancel()  # the shielded sleep would otherwise outlive the test
    assert handle.exit_code == EXIT_DRAIN_FORCED


async def test_progress_is_logged_every_second_while_draining(autojump_clock):
    """The drain logs a progress line with per-endpoint in-flight counts at least once a second."""
    transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        handle = await _serve(WorkerConfig(), transport, nursery)
        transport.start_request("tokens", {"n": 4})
        await trio.sleep(0.5)
        with capture_logs() as logs:
            handle.shutdown("test")
            await handle.wait_drained()
    progress = [e for e in logs if e["event"] == "shutdown.progress"]
    assert len(progress) == 3  # at 1, 2 and 3 s of a 3.5 s drain
    assert progress[0]["endpoints"] == {"memory/tokens": 1} and progress[0]["in_flight"] == 1


async def test_sigterm_then_sigint_drive_the_coordinator():
    """A real SIGTERM starts the drain and a following SIGINT forces it (signal handling end to end)."""
    transport = MemoryTransport()
    async with open_worker(
        _worker(), [transport], WorkerConfig(drain_timeout=60), handle_signals=True
    ) as handle:
        _, sink = transport.start_request("tokens", {"n": 1000})
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(5):
            await handle.wait_shutdown_started()
        assert not handle.ready
        os.kill(os.getpid(), signal.SIGINT)
        with trio.fail_after(5):
            await handle.wait_drained()
    assert handle.exit_code == EXIT_DRAIN_FORCED
    assert sink.error is not None and sink.error.code is ErrorCode.SHUTTING_DOWN


def test_worker_config_rejects_nonsense():
    """Negative or NaN timeouts fail at construction with the field's name."""
    with pytest.raises(ValueError, match="drain_timeout"):
        WorkerConfig(drain_timeout=-1)
    with pytest.raises(ValueError, match="shutdown_delay"):
        WorkerConfig(shutdown_delay=float("nan"))
