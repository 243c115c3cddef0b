"""The contract, part 1: what a caller gets back. Answers, and every error a request can end with
before or while it runs (the ones that need a held handler or a drain are in the other files)."""

from __future__ import annotations

import pytest
import trio

from .helpers import TEST_TIMEOUT, chunks, outcomes


async def test_unary_call_answers_once(driver):
    """A unary endpoint answers its one value and the call ends cleanly, counted ok."""
    request = {"text": "héllo", "list": [1, 2.5, None, True], "nested": {"a": []}}
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("echo", request)
        await driver.idle("echo")
    assert reply.ok and reply.chunks == [request]
    assert outcomes(driver, "echo") == {"ok": 1}


async def test_stream_delivers_every_chunk_in_order_then_a_clean_end(driver):
    """A stream's chunks all arrive, in order, followed by a clean end (not a cut), counted ok."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("tokens", {"n": 50})
        await driver.idle("tokens")
    assert reply.ok and reply.chunks == chunks(50)
    assert outcomes(driver, "tokens") == {"ok": 1}


async def test_empty_stream_ends_cleanly(driver):
    """A stream that yields nothing still ends with an explicit clean end."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("tokens", {"n": 0})
    assert reply.ok and reply.chunks == []


async def test_undecodable_payload_is_bad_request_counted_as_error(driver, probe):
    """A payload that is not JSON is BAD_REQUEST (not retryable), the handler never runs, outcome error."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("tokens", b'{"n": 3,')
        await driver.idle("tokens")
    assert reply.code == "BAD_REQUEST" and reply.retryable is False and reply.chunks == []
    assert "not valid JSON" in reply.message
    assert not probe.finished.is_set()
    assert outcomes(driver, "tokens") == {"error": 1}


@pytest.mark.needs("has_timeout_text", reason="the timeout is a binary field, every value of it is valid")
async def test_malformed_timeout_is_bad_request(driver):
    """A timeout header/field that is not a positive integer of milliseconds is BAD_REQUEST."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("echo", {}, timeout_text="soon")
        await driver.idle("echo")
    assert reply.code == "BAD_REQUEST" and reply.retryable is False and reply.chunks == []
    assert outcomes(driver, "echo") == {"error": 1}


@pytest.mark.deviates(
    nats="nobody subscribes to an unknown endpoint's subject: the NATS server answers 'no responders', "
    "which the caller sees as a retryable UNAVAILABLE (docs/protocol-nats.md, Replies)"
)
async def test_unknown_endpoint_is_not_found(driver):
    """An endpoint the worker does not serve is NOT_FOUND, not retryable, and the message names it."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("no-such-endpoint", {})
    assert reply.code == "NOT_FOUND" and reply.retryable is False
    assert "no-such-endpoint" in reply.message


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        ({"code": "BAD_REQUEST", "message": "field x must be positive"}, False),
        ({"code": "OVERLOADED", "message": "GPU memory is full"}, True),
        ({"code": "UNAVAILABLE", "message": "model not loaded", "retryable": False}, False),
        ({"code": "DEADLINE_EXCEEDED", "message": "upstream timed out", "retryable": True}, True),
        ({"code": "INTERNAL", "message": "generation failed"}, False),
    ],
    ids=["bad-request", "overloaded-default-retryable", "explicitly-not-retryable", "explicitly-retryable",
         "internal"],
)  # fmt: skip
async def test_handler_ingress_error_reaches_the_caller_with_its_code_and_retryable_flag(
    driver, error, retryable
):
    """An IngressError a handler raises reaches the caller with its code, message and retryable flag."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("fail", error)
        await driver.idle("fail")
    assert (reply.code, reply.retryable, reply.message) == (error["code"], retryable, error["message"])
    assert reply.chunks == []
    assert outcomes(driver, "fail") == {"error": 1}


async def test_plain_exception_is_internal_without_its_text(driver):
    """A handler's plain exception is INTERNAL, not retryable, and its text never reaches the caller."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("fail", {"plain": "database password is hunter2"})
        await driver.idle("fail")
    assert reply.code == "INTERNAL" and reply.retryable is False
    assert "hunter2" not in reply.message and "RuntimeError" not in reply.message
    assert outcomes(driver, "fail") == {"error": 1}


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ({"code": "INTERNAL", "message": "failed half-way"}, "INTERNAL", "failed half-way"),
        ({"plain": "secret"}, "INTERNAL", None),
    ],
    ids=["ingress-error", "plain-exception"],
)
async def test_error_after_the_first_chunk_arrives_in_the_stream(driver, error, code, message):
    """A stream that fails after some chunks delivers them, then the error: never a silent cut."""
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("tokens", {"n": 5, "fail_at": 2, "error": error})
        await driver.idle("tokens")
    assert reply.chunks == chunks(2) and not reply.ended and reply.cut is None
    assert reply.code == code and reply.retryable is False
    if message is not None:
        assert reply.message == message
    else:
        assert "secret" not in reply.message
    assert outcomes(driver, "tokens") == {"error": 1}


@pytest.mark.parametrize("code", ["UNAVAILABLE", "OVERLOADED"])
async def test_a_retryable_code_raised_after_a_chunk_is_not_retryable(driver, code):
    """A code that is retryable by default (nothing was started) is not, once chunks were sent: a retry
    elsewhere would duplicate output the caller already has (docs/protocol-tcp.md, Errors)."""
    error = {"code": code, "message": "replica lost"}
    with trio.fail_after(TEST_TIMEOUT):
        reply = await driver.call("tokens", {"n": 5, "fail_at": 2, "error": error})
    assert reply.chunks == chunks(2) and reply.code == code
    assert reply.retryable is False
