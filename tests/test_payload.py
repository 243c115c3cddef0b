"""The one decoding/encoding boundary (runtime/_payload.py and dispatch_payload): any input is an answer."""

from __future__ import annotations

import math

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from runtime import BadRequest, ErrorCode, InternalError, RequestContext, Worker, dispatch_payload
from runtime._payload import decode_payload, encode_json, parse_deadline
from runtime.testing import RecordingSink, bind_for_test, sample
from transports.nats import _protocol as nats_protocol

HOSTILE_PAYLOADS = [
    b"[" * 100_000,  # RecursionError inside json, not a ValueError
    b'{"a":' * 50_000,
    b"1" * 5_000,  # over Python's int-string conversion limit
    b"NaN",
    b"[Infinity]",
    b"1e999",  # decodes to inf otherwise
    b"\xff\xfe{}",  # not UTF-8
    b'"\\ud800"x',
]
HOSTILE_TIMEOUTS = ["²", "١٢٣", "1" * 5_000, "0", "-5", "1.5", " 5", "", "99999999999"]


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS, ids=lambda p: repr(p[:12]))
def test_hostile_payloads_are_bad_requests(payload):
    """Every payload that is not strict, decodable JSON is BadRequest, whatever broke inside the decoder."""
    with pytest.raises(BadRequest) as caught:
        decode_payload(payload)
    assert "payload" in caught.value.message and len(caught.value.message) < 300


@pytest.mark.parametrize("header", HOSTILE_TIMEOUTS)
def test_hostile_timeouts_are_bad_requests_that_name_the_header(header):
    """Unicode digits, 5,000 digits, zero, signs and blanks in a timeout are BadRequest naming the header."""
    with pytest.raises(BadRequest, match="x-request-timeout-ms") as caught:
        parse_deadline(0.0, header, timeout_name="x-request-timeout-ms")
    assert len(caught.value.message) < 200


@pytest.mark.parametrize("header", ["nan", "inf", "1e999", "١٢٣", "soon", ""])
def test_a_malformed_absolute_deadline_is_a_bad_request(header):
    """An absolute deadline that is not finite ASCII Unix seconds is BadRequest, never a NaN deadline."""
    with pytest.raises(BadRequest, match="Unix seconds"):
        parse_deadline(0.0, deadline_unix=header)


def test_deadline_is_the_earlier_of_relative_and_absolute():
    """A relative timeout counts from arrival; an absolute deadline in the past wins over it."""
    assert parse_deadline(100.0, "2500") == 102.5
    assert parse_deadline(100.0, 7) == 100.007
    assert parse_deadline(100.0) == math.inf
    assert parse_deadline(100.0, "2500", "1") < 100.0  # 1970: already too late


@pytest.mark.parametrize("value", [math.nan, math.inf, [1, -math.inf], {1, 2}, object(), b"bytes"], ids=repr)
def test_values_that_are_not_json_are_internal_errors(value):
    """NaN, Infinity and non-JSON types are refused at encoding: never invalid JSON on the wire."""
    with pytest.raises(InternalError, match="not JSON"):
        encode_json(value)


def test_a_value_nested_too_deeply_to_encode_is_an_internal_error():
    """A value nested past the interpreter's recursion limit is an InternalError, not a RecursionError."""
    deep: list = []
    for _ in range(100_000):  # past the interpreter's limit, whichever applies (3.12+ counts C frames)
        deep = [deep]
    with pytest.raises(InternalError, match="nested too deeply"):
        encode_json(deep)


def test_encoding_is_compact_strict_json():
    """Values encode as compact JSON with non-ASCII escaped, exactly what every transport frames."""
    assert encode_json({"a": [1, 2.5, None, "é"]}) == b'{"a":[1,2.5,null,"\\u00e9"]}'


def _worker() -> Worker:
    worker = Worker("fuzz")

    @worker.endpoint("echo")
    async def echo(request, ctx: RequestContext):
        return request

    @worker.endpoint("nan")
    async def nan(request, ctx: RequestContext):
        return {"score": math.nan}

    @worker.endpoint("tokens")
    async def tokens(request, ctx: RequestContext):
        yield 1
        yield math.inf

    return worker


async def _intake(
    endpoint: str, payload: bytes, headers: dict[str, str]
) -> tuple[str, RecordingSink, object]:
    """One request through the core's wire intake, the way the NATS transport hands it over."""
    bound = bind_for_test(_worker())
    sink = RecordingSink()
    outcome = await dispatch_payload(
        bound.endpoint(endpoint),
        bound.context(endpoint),
        payload,
        sink,
        timeout_ms=headers.get(nats_protocol.TIMEOUT_MS),
        deadline_unix=headers.get(nats_protocol.DEADLINE),
        timeout_name=nats_protocol.TIMEOUT_MS,
    )
    return outcome, sink, bound


@given(
    payload=st.one_of(st.binary(max_size=200), st.sampled_from(HOSTILE_PAYLOADS)),
    timeout=st.one_of(st.none(), st.text(max_size=30), st.sampled_from(HOSTILE_TIMEOUTS)),
    deadline=st.one_of(st.none(), st.text(max_size=30), st.floats().map(repr)),
)
@settings(max_examples=300, deadline=None)
def test_fuzzed_intake_always_ends_in_one_counted_outcome(payload, timeout, deadline):
    """Any body and any deadline headers end in ok or BAD_REQUEST, counted once, with nothing in flight."""
    headers = {
        k: v
        for k, v in ((nats_protocol.TIMEOUT_MS, timeout), (nats_protocol.DEADLINE, deadline))
        if v is not None
    }
    outcome, sink, bound = trio.run(_intake, "echo", payload, headers)
    if outcome == "ok":
        assert len(sink.chunks) == 1 and sink.ended
    else:
        assert outcome in ("error", "rejected")  # rejected: an absolute deadline already past
        assert sink.error is not None and sink.error.code in (
            ErrorCode.BAD_REQUEST,
            ErrorCode.DEADLINE_EXCEEDED,
        )
    runtime = bound.runtime
    total = sum(
        sample(runtime, "ingress_requests_total", endpoint="echo", transport="test", outcome=o)
        for o in ("ok", "error", "rejected")
    )
    assert total == 1
    assert sample(runtime, "ingress_inflight_requests", endpoint="echo", transport="test") == 0
    assert bound.endpoint("echo").statistics().in_flight == 0


async def test_a_handler_returning_nan_gets_internal_not_invalid_json():
    """A unary NaN is INTERNAL for that request (not retryable), never on the wire, and logged why."""
    with capture_logs() as logs:
        outcome, sink, _ = await _intake("nan", b"{}", {})
    assert outcome == "error" and sink.chunks == []
    assert [e["error"] for e in logs if e["event"] == "handler.bad_value"] == [sink.error.message]
    assert sink.error is not None and sink.error.code is ErrorCode.INTERNAL and sink.retryable is False
    assert "not JSON" in sink.error.message


async def test_a_stream_yielding_infinity_ends_with_an_error_after_its_good_chunks():
    """A stream that yields Infinity keeps the chunks before it and ends with INTERNAL, not a cut."""
    outcome, sink, _ = await _intake("tokens", b"", {})
    assert outcome == "error" and sink.chunks == [1]
    assert sink.error is not None and sink.error.code is ErrorCode.INTERNAL and not sink.ended
