"""The core's intake (Caller, Call): refusals, the caller's registry, and one outcome for every call."""

from __future__ import annotations

import pytest
import trio
from structlog.testing import capture_logs

from runtime import (
    BadRequest,
    Caller,
    ErrorCode,
    NotFound,
    Overloaded,
    RequestContext,
    Unavailable,
    Worker,
)
from runtime.testing import RecordingSink, bind_for_test, sample


def _worker(started: list[RequestContext]) -> Worker:
    worker = Worker("t")

    @worker.endpoint("hold")
    async def hold(request, ctx: RequestContext):
        started.append(ctx)
        for i in range(1000):
            yield i
            await trio.sleep(1)

    return worker


def _outcome(bound, outcome: str, endpoint: str = "hold") -> float:
    return sample(
        bound.runtime, "ingress_requests_total", endpoint=endpoint, transport="test", outcome=outcome
    )


async def test_refusals_name_the_reason_and_count_only_rejections():
    """Unknown endpoint, draining and the caller's limit are refused with the right code, before accept."""
    bound = bind_for_test(_worker([]))
    caller = Caller(bound.transport, max_calls=1)
    with pytest.raises(NotFound, match="serves: hold"):  # says what this worker does serve
        caller.open(1, "nope")
    caller.open(1, "hold")
    with pytest.raises(Overloaded) as over_limit:
        caller.open(2, "hold")
    assert over_limit.value.resolve_retryable(chunks_sent=0)
    bound.transport.close_intake()
    with pytest.raises(Unavailable) as draining:
        Caller(bound.transport).open(3, "hold")
    assert draining.value.retryable is True
    rejections = {
        reason: sample(
            bound.runtime, "ingress_rejections_total", endpoint="hold", transport="test", reason=reason
        )
        for reason in ("stream_limit", "unavailable")
    }
    assert rejections == {"stream_limit": 1.0, "unavailable": 1.0}
    assert bound.endpoint("hold").tracker.count == 1  # only the accepted one is in flight


async def test_caller_gone_kills_every_open_call_and_counts_each_once(autojump_clock):
    """A caller that leaves cancels all its calls; each is `disconnected` under the reason, once."""
    started: list[RequestContext] = []
    bound = bind_for_test(_worker(started))
    caller = Caller(bound.transport)
    sinks = [RecordingSink() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for key, sink in enumerate(sinks):
            nursery.start_soon(caller.open(key, "hold").run, b"{}", sink)
        await sinks[-1].chunk_sent.wait()
        assert len(caller) == 3
        caller.gone("reset")
        caller.gone("closed")  # a second notice changes nothing
    assert len(caller) == 0 and bound.endpoint("hold").tracker.count == 0
    assert _outcome(bound, "disconnected") == 3
    gone = sample(
        bound.runtime, "ingress_client_disconnects_total", endpoint="hold", transport="test", reason="reset"
    )
    assert gone == 3


async def test_stop_kill_and_find_reach_only_the_call_named(autojump_clock):
    """stop ends one stream cleanly, kill cancels another with CANCELLED; find matches endpoint and id."""
    bound = bind_for_test(_worker([]))
    caller = Caller(bound.transport)
    stopped, killed = RecordingSink(), RecordingSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller.open("a", "hold", request_id="same").run, b"{}", stopped)
        nursery.start_soon(caller.open("b", "hold", request_id="other").run, b"{}", killed)
        await stopped.chunk_sent.wait()
        await killed.chunk_sent.wait()
        assert [c.key for c in caller.find("hold", "same")] == ["a"]
        assert caller.find("nope", "same") == []
        assert caller.stop("a") and caller.kill("b")
    assert stopped.ended and stopped.error is None and len(stopped.chunks) < 1000
    assert killed.error is not None and killed.error.code is ErrorCode.CANCELLED
    assert not caller.stop("a") and not caller.kill("b")  # finished: nothing to signal


async def test_calls_that_never_run_still_get_exactly_one_outcome():
    """fail() answers and counts an error; abandon() counts a disconnect; in flight returns to zero."""
    bound = bind_for_test(_worker([]))
    caller = Caller(bound.transport)
    sink = RecordingSink()
    with capture_logs() as logs:
        await caller.open(1, "hold").fail(BadRequest("body too large"), sink)
        caller.open(2, "hold").abandon("closed")
    assert sink.error is not None and sink.error.code is ErrorCode.BAD_REQUEST
    assert (_outcome(bound, "error"), _outcome(bound, "disconnected")) == (1, 1)
    assert [line["outcome"] for line in logs if line["event"] == "request"] == ["error", "disconnected"]
    assert bound.endpoint("hold").tracker.count == 0 and len(caller) == 0


async def test_undecodable_payload_is_a_counted_bad_request():
    """A payload that is not JSON is BAD_REQUEST for that call and counted `error` (every transport)."""
    bound = bind_for_test(_worker([]))
    sink = RecordingSink()
    outcome = await Caller(bound.transport).open(1, "hold").run(b"{not json", sink)
    assert outcome == "error" and sink.error is not None and sink.error.code is ErrorCode.BAD_REQUEST
    assert _outcome(bound, "error") == 1


async def test_a_second_request_under_an_open_key_is_refused_not_merged():
    """Two requests under one key (a NATS reply subject used twice) cannot share an entry: 2nd refused."""
    bound = bind_for_test(_worker([]))
    caller = Caller(bound.transport)
    first = caller.open("inbox.1", "hold")
    with pytest.raises(BadRequest, match="still running"):
        caller.open("inbox.1", "hold")
    assert caller.get("inbox.1") is first and bound.endpoint("hold").tracker.count == 1


async def test_a_call_killed_before_it_runs_never_starts_its_handler():
    """A KILL (or the caller leaving) between accept and run: the handler is never entered."""
    started: list[RequestContext] = []
    bound = bind_for_test(_worker(started))
    caller = Caller(bound.transport)
    killed, gone = RecordingSink(), RecordingSink()
    first, second = caller.open(1, "hold"), caller.open(2, "hold")
    caller.kill(1)
    caller.drop(2, "reset")
    assert await first.run(b"{}", killed) == "cancelled"
    assert await second.run(b"{}", gone) == "disconnected"
    assert started == [] and killed.error is not None and killed.error.code is ErrorCode.CANCELLED
    assert gone.error is None and gone.chunks == []


async def test_a_caller_gone_before_its_payload_is_decoded_counts_as_a_disconnect():
    """Gone, then an undecodable payload: nobody is told, and it is one disconnect, not an error."""
    bound = bind_for_test(_worker([]))
    caller = Caller(bound.transport)
    call = caller.open(1, "hold")
    caller.gone("closed")
    sink = RecordingSink()
    assert await call.run(b"{oops", sink) == "disconnected"
    assert sink.error is None and (_outcome(bound, "disconnected"), _outcome(bound, "error")) == (1, 0)


async def test_a_call_is_settled_once():
    """run, fail or abandon a second time is a bug in the transport, said at once."""
    bound = bind_for_test(_worker([]))
    call = Caller(bound.transport).open(1, "hold")
    call.abandon("closed")
    with pytest.raises(RuntimeError, match="already"):
        await call.fail(BadRequest("x"), RecordingSink())
    assert _outcome(bound, "disconnected") == 1 and _outcome(bound, "error") == 0
