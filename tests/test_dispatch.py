"""The dispatcher: every way a request can end maps to one outcome, one answer and the right metrics."""

import pytest
import trio
from structlog.testing import capture_logs

from runtime import (
    BadRequest,
    ErrorCode,
    KillReason,
    Overloaded,
    RequestContext,
    Worker,
    dispatch,
)
from runtime.testing import RecordingSink, bind_for_test, sample


def _worker() -> Worker:
    worker = Worker("t")

    @worker.endpoint("tokens", inactivity_timeout=3)
    async def tokens(request, ctx: RequestContext):
        for i in range(request["n"]):
            await trio.sleep(request.get("gap", 0))
            yield i

    @worker.endpoint("unary")
    async def unary(request, ctx):
        if request == "bad":
            raise BadRequest("bad input, fix the field")
        if request == "boom":
            raise KeyError("secret-token-123")
        return {"got": request}

    @worker.endpoint("nursery_error")
    async def nursery_error(request, ctx):
        async with trio.open_nursery():
            raise Overloaded("busy inside a nursery")

    return worker


async def _run(name: str, request, *, deadline: float = float("inf"), sink: RecordingSink | None = None):
    bound = bind_for_test(_worker())
    sink = sink or RecordingSink()
    ctx = bound.context(name, deadline=deadline)
    outcome = await dispatch(bound.endpoint(name), ctx, request, sink)
    return outcome, sink, bound


async def test_stream_ok_sends_every_chunk_then_end(autojump_clock):
    """A completed stream sends all chunks, then END, and is counted ok with its time to first chunk."""
    outcome, sink, bound = await _run("tokens", {"n": 3, "gap": 0.5})
    assert (outcome, sink.chunks, sink.ended, sink.error) == ("ok", [0, 1, 2], True, None)
    labels = {"endpoint": "tokens", "transport": "test"}
    assert sample(bound.runtime, "ingress_requests_total", **labels, outcome="ok") == 1
    assert sample(bound.runtime, "ingress_time_to_first_chunk_seconds_sum", **labels) == pytest.approx(0.5)
    assert bound.global_inflight.count == 0


async def test_durations_are_measured_from_accept_not_from_when_dispatch_began(autojump_clock):
    """Time a request spent between the transport's accept and dispatch counts in its duration and TTFC."""
    bound = bind_for_test(_worker())
    ctx = bound.context("unary")  # accepted now
    await trio.sleep(1.0)  # e.g. waiting for its task to be scheduled on a busy worker
    await dispatch(bound.endpoint("unary"), ctx, "x", RecordingSink())
    labels = {"endpoint": "unary", "transport": "test"}
    assert sample(bound.runtime, "ingress_request_duration_seconds_sum", **labels) == pytest.approx(1.0)
    assert sample(bound.runtime, "ingress_time_to_first_chunk_seconds_sum", **labels) == pytest.approx(1.0)


async def test_unexpected_exception_becomes_internal_without_leaking_its_text():
    """Any other exception becomes INTERNAL with a safe message, and is logged with its traceback."""
    with capture_logs() as logs:
        outcome, sink, _ = await _run("unary", "boom")
    assert outcome == "error" and sink.error is not None
    assert sink.error.code is ErrorCode.INTERNAL
    assert "secret-token-123" not in sink.error.message
    failed = [entry for entry in logs if entry["event"] == "handler.failed"]
    assert failed and isinstance(failed[0]["exc_info"], KeyError)


async def test_lone_error_inside_a_handler_nursery_keeps_its_code():
    """An IngressError wrapped in an ExceptionGroup by the handler's nursery still keeps its code."""
    _, sink, _ = await _run("nursery_error", None)
    assert sink.error is not None and sink.error.code is ErrorCode.OVERLOADED and sink.retryable is True


async def test_caller_deadline_cancels_the_handler(autojump_clock):
    """The caller's deadline bounds the handler exactly, and the caller gets DEADLINE_EXCEEDED."""
    start = trio.current_time()
    outcome, sink, _ = await _run("tokens", {"n": 10, "gap": 1}, deadline=start + 3.5)
    assert trio.current_time() - start == pytest.approx(3.5)
    assert outcome == "error" and sink.chunks == [0, 1, 2]
    assert sink.error is not None and sink.error.code is ErrorCode.DEADLINE_EXCEEDED


async def test_expired_deadline_is_rejected_before_the_handler_runs(autojump_clock):
    """A request whose deadline passed before it arrived never starts."""
    outcome, sink, bound = await _run("unary", 1, deadline=trio.current_time())
    assert outcome == "rejected" and sink.error is not None
    assert (
        sample(
            bound.runtime, "ingress_rejections_total", endpoint="unary", transport="test", reason="deadline"
        )
        == 1
    )


async def test_inactivity_timeout_kills_a_silent_stream(autojump_clock):
    """A stream that yields nothing for inactivity_timeout is killed and its caller told why."""
    start = trio.current_time()
    outcome, sink, bound = await _run("tokens", {"n": 5, "gap": 10})
    assert trio.current_time() - start == pytest.approx(3)
    assert outcome == "error" and sink.error is not None
    assert sink.error.code is ErrorCode.DEADLINE_EXCEEDED and "inactivity_timeout" in sink.error.message
    assert (
        sample(bound.runtime, "ingress_inactivity_timeouts_total", endpoint="tokens", transport="test") == 1
    )


async def test_slow_reader_is_not_mistaken_for_inactivity(autojump_clock):
    """Time blocked on a slow caller (back-pressure) does not count against inactivity_timeout."""
    gate = trio.Event()
    sink = RecordingSink(gate=gate)

    async def open_gate_late():
        await trio.sleep(60)
        gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_late)
        outcome, sink, _ = await _run("tokens", {"n": 3}, sink=sink)
    assert outcome == "ok" and sink.chunks == [0, 1, 2]


@pytest.mark.parametrize(
    ("reason", "outcome", "code"),
    [
        (KillReason.CALLER_KILL, "cancelled", ErrorCode.CANCELLED),
        (KillReason.SHUTDOWN, "shutdown", ErrorCode.SHUTTING_DOWN),
        (KillReason.DISCONNECTED, "disconnected", None),
    ],
)
async def test_kill_ends_the_handler_with_the_reasons_outcome(autojump_clock, reason, outcome, code):
    """ctx.kill() cancels the handler now; the outcome and the caller's error follow the reason."""
    from runtime import ShuttingDown

    bound = bind_for_test(_worker())
    sink = RecordingSink()
    ctx = bound.context("tokens")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: dispatch(bound.endpoint("tokens"), ctx, {"n": 100, "gap": 1}, sink))
        await trio.sleep(2.5)
        ctx.kill(reason, ShuttingDown("draining") if reason is KillReason.SHUTDOWN else None)
    assert ctx.is_killed and ctx.is_stopped and sink.chunks == [0, 1]
    labels = {"endpoint": "tokens", "transport": "test"}
    assert sample(bound.runtime, "ingress_requests_total", **labels, outcome=outcome) == 1
    assert (sink.error.code if sink.error else None) is code
    if reason is KillReason.SHUTDOWN:
        assert sink.retryable is False  # chunks were already sent: a retry would duplicate them


async def test_stop_generating_ends_the_stream_gracefully(autojump_clock):
    """stop_generating() ends the stream after the current chunk with END, not an error."""
    bound = bind_for_test(_worker())
    sink = RecordingSink()
    ctx = bound.context("tokens")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: dispatch(bound.endpoint("tokens"), ctx, {"n": 100, "gap": 1}, sink))
        await trio.sleep(1.5)
        ctx.stop_generating()
    assert ctx.is_stopped and not ctx.is_killed
    assert sink.chunks == [0, 1] and sink.ended and sink.error is None


async def test_caller_gone_during_send_counts_as_disconnected():
    """A sink that reports the caller gone ends the request as disconnected, with nothing sent."""
    outcome, sink, bound = await _run("unary", 1, sink=RecordingSink(gone=True))
    assert outcome == "disconnected" and sink.error is None
    assert bound.global_inflight.count == 0


async def test_one_canonical_log_line_per_request():
    """Each request logs exactly one 'request' line with id, endpoint, transport, outcome and chunks."""
    with capture_logs() as logs:
        await _run("unary", 5)
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    assert {k: lines[0][k] for k in ("request_id", "endpoint", "transport", "outcome", "chunks")} == {
        "request_id": "test",
        "endpoint": "unary",
        "transport": "test",
        "outcome": "ok",
        "chunks": 1,
    }


def test_registering_a_plain_function_is_refused():
    """Only async functions and async generators can be endpoints."""
    worker = Worker("w")
    with pytest.raises(TypeError, match="async"):
        worker.add_endpoint("sync", lambda request, ctx: None)
    handler = _worker().endpoints["unary"].handler
    worker.endpoint("x")(handler)
    with pytest.raises(ValueError, match="already registered"):
        worker.endpoint("x")(handler)
