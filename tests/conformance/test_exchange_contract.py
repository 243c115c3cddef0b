"""The exchange contract (duplex endpoints, docs/exchanges.md) on every transport that carries exchanges:
memory, TCP, HTTP/1.1, h2 and NATS, each through its ``ExchangeDriver`` (exchange_drivers.py), each
behaviour written once:

- every message answered in order, the caller's half-close, a message that is not JSON, an unknown
  endpoint refused while the caller's input is still open;
- interleaving both ways: a handler that answers before it reads while the caller sends each message only
  once it has read the last answers, and a handler that reads several messages before it answers;
- the server's half-close: a handler that finishes first while its caller keeps sending ends cleanly,
  later messages are refused or dropped, and the connection serves the next exchange;
- a slow reader on each side, bounded: input the handler does not take waits within the endpoint's
  ``max_input_bytes``; answers the caller does not read hold the handler back (NATS: its documented
  buffer, then an explicit gap), and a sibling exchange on the same connection goes on meanwhile;
- kill, stop, disconnect and ``input_timeout`` mid-exchange; the drain (the running exchange goes on, a
  new one is refused at once);
- the same accounting everywhere (outcomes and ``ingress_exchange_messages_total``) for the same script.

Where the docs say a transport differs, its driver says so and the test checks the documented form (a
caller that cannot hear its own kill, NATS's answer buffer); a documented deviation from the contract is
a strict xfail (``deviates``), a runtime bug this contract found a strict xfail naming it (``bug``), work
in progress a non-strict one (``pending``): see conftest.py. No test waits on time: outcomes are awaited
through events, and "nothing more happened" is asserted once every task of the process has settled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from runtime import WorkerConfig

from .app import INPUT_WINDOW, ExchangeProbe
from .drivers import samples
from .exchange_drivers import Ending, SendRefused, compact, open_exchange_driver, run_exchange
from .helpers import TEST_TIMEOUT, outcomes

T = TypeVar("T")

# How long every task of this process must have been blocked before a test takes it that nothing more
# is on its way (see ``settle``).
QUIET = 0.05
# How long a stall of this process must last before it counts as a deadlock (see ``unless_stalled``).
STALL = 0.3
# Chunks a flood is asked for where the caller's not reading must stop it: more than any buffer holds.
UNLIMITED = 10**9
# Bytes of padding per flood chunk where it is held back: the buffers that hold it fill in few chunks.
FLOOD_PAD = 1000
# What may sit in buffers between a handler and a caller that does not read (socket buffers, writers'
# high-water marks, a client's own buffer), generously: the point is that it is bounded.
ANSWER_SLACK = 16 * 1024 * 1024


def turns(answers: list[Any]) -> list[tuple[int, int]]:
    """chat's answers as (turn, index)."""
    return [(answer["turn"], answer["index"]) for answer in answers]


def exchanged(driver: Any, endpoint: str) -> dict[str, float]:
    """``ingress_exchange_messages_total`` of ``endpoint``, by direction (non-zero only)."""
    found = samples(
        driver.handle, "ingress_exchange_messages_total", driver.transport, "endpoint", "direction"
    )
    return {direction: value for (name, direction), value in found.items() if name == endpoint}


async def settle() -> None:
    """Let what is on its way land: every task of this process (the worker, its transport, the caller,
    the asyncio loop under NATS) blocked for QUIET seconds. Used only before asserting that something
    did *not* happen (a bound held); outcomes are waited for by their own events."""
    await trio.testing.wait_all_tasks_blocked(cushion=QUIET)


async def unless_stalled(driver: Any, run: Callable[[], Awaitable[T]]) -> T:
    """``await run()``, failing at once if everything stalls first (every task blocked for STALL
    seconds: with every party in this process, that is a deadlock) rather than at the test's timeout.
    Over NATS a nats-server stands between the parties, so only the test's timeout bounds it."""
    results: list[T] = []
    async with trio.open_nursery() as nursery:

        async def go() -> None:
            results.append(await run())
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            await trio.testing.wait_all_tasks_blocked(cushion=STALL)
            nursery.cancel_scope.cancel()

        nursery.start_soon(go)
        if driver.in_process:
            nursery.start_soon(watch)
    assert results, f"stalled: nothing moved for {STALL} s"
    return results[0]


async def test_every_message_is_answered_in_order_and_the_half_close_ends_it(exchange_driver):
    """Two messages, then the half-close: both turns answered in order, then a clean end; two messages
    counted received and three sent."""
    with trio.fail_after(TEST_TIMEOUT):
        answers, ending = await run_exchange(
            exchange_driver, "chat", [b'{"max_tokens":2}', b'{"max_tokens":1}']
        )
        # The caller may hold the last byte before the worker has counted the exchange (HTTP): once it
        # is out of flight, it is counted.
        await exchange_driver.idle("chat")
    assert ending.ok and turns(answers) == [(0, 0), (0, 1), (1, 0)]
    assert exchanged(exchange_driver, "chat") == {"received": 2, "sent": 3}


async def test_a_message_that_is_not_json_ends_the_exchange_with_bad_request(exchange_driver):
    """After the answers to what came before, BAD_REQUEST, not retryable; never a cut or a crash."""
    with trio.fail_after(TEST_TIMEOUT):
        answers, ending = await run_exchange(exchange_driver, "chat", [b'{"max_tokens":1}', b"{not json"])
    assert ending.code == "BAD_REQUEST" and ending.retryable is False and turns(answers) == [(0, 0)]


async def test_a_handler_may_answer_first_and_the_caller_send_each_message_after_reading(exchange_driver):
    """greet_first answers before the caller sent anything; each next message goes out only once the
    last answer was read, and is answered while the input is still open."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("greet_first") as exchange:
            assert await exchange.next_answer() == {"hello": True}
            for n in (1, 2):
                await exchange.send({"n": n})
                assert await exchange.next_answer() == {"echo": {"n": n}}
            await exchange.end()
            rest, ending = await exchange.finish()
    assert rest == [] and ending.ok


async def test_a_caller_sending_far_ahead_while_it_reads_gets_every_answer_in_order(exchange_driver):
    """3,000 messages sent as fast as flow control lets them while another task reads: the input runs
    a window ahead of the handler and the answers fill the caller's window, and nothing deadlocks (h2
    once did: the worker stopped reading the connection, WINDOW_UPDATEs included, while a body waited)."""
    count = 3000
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("chat") as exchange, trio.open_nursery() as nursery:

            async def send_all() -> None:
                for _ in range(count):
                    await exchange.send({"max_tokens": 1, "pad": "x" * 40})
                await exchange.end()

            nursery.start_soon(send_all)
            answers, ending = await exchange.finish()
    assert ending.ok and [answer["turn"] for answer in answers] == list(range(count))


async def test_a_handler_may_read_several_messages_before_it_answers(exchange_driver):
    """batch takes two messages per answer: the caller reads each pair's answer before it sends on; the
    half-close flushes the odd one out."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("batch") as exchange:
            for pair in ((1, 2), (3, 4)):
                for n in pair:
                    await exchange.send({"n": n})
                assert await exchange.next_answer() == [{"n": n} for n in pair]
            await exchange.send({"n": 5})
            await exchange.end()
            rest, ending = await exchange.finish()
    assert rest == [[{"n": 5}]] and ending.ok


@pytest.mark.deviates(
    nats="nobody subscribes to an unknown endpoint's subject: the NATS server answers 'no responders', "
    "which the caller sees as a retryable UNAVAILABLE (docs/protocol-nats.md, Replies)"
)
async def test_an_exchange_with_an_unknown_endpoint_is_refused_at_once(exchange_driver):
    """A caller that opens an exchange with an endpoint the worker does not serve and waits for an answer,
    its input still open, hears NOT_FOUND (not retryable) at once: it need not half-close to hear it."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("no_such_endpoint") as exchange:
            answers, ending = await unless_stalled(exchange_driver, exchange.finish)
    assert answers == [] and ending.code == "NOT_FOUND" and ending.retryable is False


async def _send_until_refused(exchange: Any, count: int) -> int:
    """Send ``count`` 100-byte messages, stopping at the first the transport refuses; how many went."""
    for i in range(count):
        try:
            await exchange.send({"late": i, "pad": "x" * 84})
        except SendRefused:
            return i
    return count


async def test_a_handler_that_finishes_first_ends_cleanly_while_its_caller_keeps_sending(exchange_driver):
    """first_only answers the first message and returns while its caller goes on sending, far past the
    window: a clean end; the caller's later messages are refused or dropped, never held, and nothing
    stalls."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("first_only") as exchange:
            await exchange.send({"n": 0})

            async def answers_while_sending() -> tuple[list[Any], Ending]:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_until_refused, exchange, 1000)  # 100 KB: past a 64 KiB window
                    finished: tuple[list[Any], Ending] = await exchange.finish()
                return finished

            answers, ending = await unless_stalled(exchange_driver, answers_while_sending)
        await exchange_driver.idle("first_only")
    assert answers == [{"n": 0}] and ending.ok
    assert outcomes(exchange_driver, "first_only") == {"ok": 1}


@pytest.mark.deviates(
    http1="docs/exchanges.md: after a handler that finished first, an HTTP/1.1 connection is closed "
    "rather than reused"
)
async def test_the_connection_serves_the_next_exchange_after_a_handler_that_finished_first(exchange_driver):
    """After first_only ended with the caller's input still coming (and then half-closed), the same
    connection carries the next exchange."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.connect() as connection:
            async with connection.open("first_only") as exchange:
                await exchange.send({"n": 0})
                assert await exchange.next_answer() == {"n": 0}
                _, first = await exchange.finish()
                await _send_until_refused(exchange, 3)
            answers, ending = await run_exchange(connection, "chat", [b'{"max_tokens":1}'])
    assert first.ok and ending.ok and turns(answers) == [(0, 0)]


async def test_a_caller_faster_than_its_handler_is_held_back_within_max_input_bytes(
    exchange_driver, exchange_probe
):
    """late_reader (max_input_bytes=64) takes nothing at first: its inbox takes the two 26-byte messages
    that fit and no more, while the caller's third send waits (TCP, NATS: for credit; memory: for room)
    or, over HTTP, sits unread in the body; once the handler reads, all ten arrive in order."""
    messages = [{"i": i, "pad": "x" * 10} for i in range(10)]
    assert {len(compact(message)) for message in messages} == {26}
    sent: list[int] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("late_reader") as exchange, trio.open_nursery() as nursery:

            async def sender() -> None:
                for i, message in enumerate(messages):
                    await exchange.send(message)
                    sent.append(i)
                await exchange.end()

            nursery.start_soon(sender)
            inbox = await exchange_probe.wait_input(exchange.request_id, received=2)
            await settle()
            taken, queued, went = inbox.received, inbox.queued_bytes, len(sent)
            exchange_probe.reading.set()
            answers, ending = await exchange.finish()
    assert taken == 2 and queued == 52 <= INPUT_WINDOW
    assert went == (2 if exchange_driver.send_waits else 10)
    assert answers == messages and ending.ok


async def _flood_unread(driver: Any, probe: ExchangeProbe, flood: Any) -> None:
    """Start ``flood`` and read none of it, until its handler is held back (a handler that is not never
    lets this process settle) or, over NATS, has made twice what the caller's inbox keeps, and waits."""
    if driver.answer_buffer is None:
        await flood.send({"n": UNLIMITED, "pad": FLOOD_PAD})
        await settle()
    else:
        await flood.send({"n": 2 * driver.answer_buffer})
        await probe.held_event(flood.request_id).wait()


async def test_a_caller_that_does_not_read_holds_the_handler_back(exchange_driver, exchange_probe):
    """flood, unread: its handler stops in its send once the buffers between it and the caller are full
    (a bounded amount), and goes on, in order, as the caller reads. NATS documents otherwise: answers
    are published as they come, and the caller's inbox keeps 4096, then reports the gap explicitly."""
    probe, buffer = exchange_probe, exchange_driver.answer_buffer
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.connect() as connection, connection.open("flood") as flood:
            await _flood_unread(exchange_driver, probe, flood)
            produced = probe.produced[flood.request_id]
            if buffer is None:
                received = [(await flood.next_answer())["i"] for _ in range(produced + 10)]
                ending = None
            else:
                # The worker publishes a later exchange's answers after the flood's, on one connection:
                # once they are in, so are the flood's (those the caller's inbox had room for).
                _, later = await run_exchange(connection, "chat", [b'{"max_tokens":1}'])
                assert later.ok
                early = [(await flood.next_answer())["i"] for _ in range(buffer // 2)]
                probe.release.set()  # one more answer, from past the gap
                rest, ending = await flood.finish()
                received = early + [answer["i"] for answer in rest]
    if buffer is None:
        assert produced < UNLIMITED and produced * FLOOD_PAD <= ANSWER_SLACK  # held back, bounded
        assert received == list(range(produced + 10))  # and on again, in order, once read
    else:
        assert produced == 2 * buffer  # nothing held it back
        assert received == list(range(len(received))) and len(received) <= buffer
        assert ending is not None and ending.code == "UNAVAILABLE" and "lost" in ending.message


@pytest.mark.needs("concurrent", reason="an HTTP/1.1 connection carries one exchange at a time")
async def test_a_sibling_exchange_goes_on_while_the_caller_does_not_read_another(
    exchange_driver, exchange_probe
):
    """With one exchange's answers left unread (its handler held back, or over NATS its inbox full), a
    second exchange on the same connection is answered to its end; then the first goes on as read."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.connect() as connection, connection.open("flood") as flood:
            await _flood_unread(exchange_driver, exchange_probe, flood)
            answers, ending = await unless_stalled(
                exchange_driver, lambda: run_exchange(connection, "chat", [b'{"max_tokens":2}'])
            )
            first = [(await flood.next_answer())["i"] for _ in range(10)]
    assert ending.ok and turns(answers) == [(0, 0), (0, 1)]
    assert first == list(range(10))


@pytest.mark.needs("concurrent", reason="an HTTP/1.1 caller leaving mid-answer must close its connection")
async def test_leaving_an_exchange_whose_answers_were_not_read_leaves_the_connection_serving(
    exchange_driver, exchange_probe
):
    """The caller leaves a flood it never read (its handler held back, or over NATS its inbox full):
    that exchange ends (killed, or its caller gone) and the same connection carries the next one."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.connect() as connection:
            async with connection.open("flood") as flood:
                await _flood_unread(exchange_driver, exchange_probe, flood)
            answers, ending = await unless_stalled(
                exchange_driver, lambda: run_exchange(connection, "chat", [b'{"max_tokens":1}'])
            )
        await exchange_driver.idle("flood")
    assert ending.ok and turns(answers) == [(0, 0)]
    assert outcomes(exchange_driver, "flood") in ({"cancelled": 1}, {"disconnected": 1})


async def test_kill_mid_exchange_cancels_the_handler(exchange_driver, exchange_probe):
    """held answers, then waits: the caller's kill cancels its handler (outcome cancelled); a caller
    that can still hear it (memory, HTTP) gets CANCELLED, not retryable, after the answer it had."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("held") as exchange:
            await exchange.send({"n": 1})
            assert await exchange.next_answer() == {"echo": {"n": 1}}
            await exchange_probe.held_event(exchange.request_id).wait()
            await exchange.kill()
            if exchange_driver.hears_kill:
                rest, ending = await exchange.finish()
                assert rest == [] and ending.code == "CANCELLED" and ending.retryable is False
        await exchange_driver.idle("held")
    assert exchange.request_id in exchange_probe.cancelled
    assert outcomes(exchange_driver, "held") == {"cancelled": 1}


async def test_stop_mid_exchange_ends_the_turn_early_and_keeps_what_was_made(exchange_driver):
    """A long turn (a token every 5 ms) stopped after two answers ends early with a clean end; the
    caller has every answer the handler made, in order."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("chat") as exchange:
            await exchange.send({"max_tokens": 100_000, "itl_ms": 5})
            first = [await exchange.next_answer() for _ in range(2)]
            await exchange.stop()
            rest, ending = await exchange.finish()
        await exchange_driver.idle("chat")
    answers = first + rest
    assert ending.ok and [answer["index"] for answer in answers] == list(range(len(answers)))
    assert len(answers) < 100_000 and outcomes(exchange_driver, "chat") == {"ok": 1}
    assert exchanged(exchange_driver, "chat") == {"received": 1, "sent": len(answers)}


async def test_a_caller_that_disconnects_mid_exchange_cancels_the_handler(exchange_driver, exchange_probe):
    """held answers, then waits; its caller goes away (connection closed; NATS: found by the probe):
    the handler is cancelled and counted disconnected, under the transport's reason."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("held") as exchange:
            await exchange.send({"n": 1})
            assert await exchange.next_answer() == {"echo": {"n": 1}}
            await exchange_probe.held_event(exchange.request_id).wait()
            await exchange.disconnect()
            await exchange_driver.idle("held")
    disconnects = samples(
        exchange_driver.handle, "ingress_client_disconnects_total", exchange_driver.transport, "reason"
    )
    assert exchange.request_id in exchange_probe.cancelled
    assert outcomes(exchange_driver, "held") == {"disconnected": 1}
    assert disconnects == {(exchange_driver.disconnect_reason,): 1}


@pytest.mark.parametrize("answered", [0, 1], ids=["silent-from-the-start", "silent-after-a-turn"])
async def test_a_caller_silent_for_input_timeout_gets_deadline_exceeded(exchange_driver, answered):
    """quiet (input_timeout=0.2 s): a caller that sends nothing more, before or after a turn, gets
    DEADLINE_EXCEEDED naming input_timeout, not retryable, after the answers it had."""
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("quiet") as exchange:
            for n in range(answered):
                await exchange.send({"n": n})
                assert await exchange.next_answer() == {"echo": {"n": n}}
            rest, ending = await exchange.finish()
        await exchange_driver.idle("quiet")
    assert rest == [] and ending.code == "DEADLINE_EXCEEDED" and ending.retryable is False
    assert "input_timeout" in ending.message
    assert outcomes(exchange_driver, "quiet") == {"error": 1}


async def test_an_exchange_in_flight_goes_on_through_the_drain(exchange_driver):
    """The drain starts mid-exchange: the running exchange still takes messages and answers them until
    its caller half-closes; the drain then ends without forcing anything."""
    handle = exchange_driver.handle
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.open("chat") as running:
            await running.send({"max_tokens": 1})
            assert turns([await running.next_answer()]) == [(0, 0)]
            handle.shutdown("conformance")
            await handle.wait_intake_closed()
            await running.send({"max_tokens": 2})
            assert turns([await running.next_answer() for _ in range(2)]) == [(1, 0), (1, 1)]
            await running.end()
            rest, ending = await running.finish()
        result = await handle.wait_drained()
    assert rest == [] and ending.ok and not result.forced
    assert outcomes(exchange_driver, "chat") == {"ok": 1}
    assert exchanged(exchange_driver, "chat") == {"received": 2, "sent": 3}


async def test_a_new_exchange_during_the_drain_is_refused_at_once(exchange_driver):
    """While an exchange holds the drain open, a new one (on the same connection where it carries
    several), its input still open, is refused UNAVAILABLE, retryable, at once: its caller need not
    half-close to hear it."""
    handle = exchange_driver.handle
    with trio.fail_after(TEST_TIMEOUT):
        async with exchange_driver.connect() as connection, connection.open("chat") as running:
            await running.send({"max_tokens": 1})
            await running.next_answer()
            handle.shutdown("conformance")
            await handle.wait_intake_closed()
            late = connection if exchange_driver.concurrent else exchange_driver
            async with late.open("greet_first") as refused:
                answers, refusal = await unless_stalled(exchange_driver, refused.finish)
            await running.end()
            await running.finish()
        result = await handle.wait_drained()
    assert answers == [] and refusal.code == "UNAVAILABLE" and refusal.retryable is True
    assert not result.forced
    assert outcomes(exchange_driver, "greet_first") == {}  # refused at the door: never run


# ---- accounting ------------------------------------------------------------------------------------------

EXCHANGE_ENDPOINTS = ("chat", "first_only", "quiet", "held")

# What the script below must produce; the reference run (memory) is checked against it, and every
# transport is then compared with the reference.
EXPECTED = {
    "requests": {
        ("chat", "ok"): 1,
        ("chat", "error"): 1,  # a message that is not JSON
        ("first_only", "ok"): 1,
        ("quiet", "error"): 1,  # input_timeout
        ("held", "cancelled"): 1,
        ("held", "disconnected"): 1,
    },
    "messages": {
        ("chat", "received"): 4,  # the bad message was received too
        ("chat", "sent"): 4,
        ("first_only", "received"): 1,
        ("first_only", "sent"): 1,
        ("held", "received"): 2,
        ("held", "sent"): 2,
    },
}


async def run_script(driver: Any) -> None:
    """An ok exchange, a bad message, a handler that finishes first, input_timeout, a kill and a
    disconnect, each after the same messages on every transport."""
    _, ok = await run_exchange(driver, "chat", [b'{"max_tokens":2}', b'{"max_tokens":1}'])
    _, bad = await run_exchange(driver, "chat", [b'{"max_tokens":1}', b"{not json"])
    _, first = await run_exchange(driver, "first_only", [b'{"n":1}'])
    async with driver.open("quiet") as quiet:
        _, silent = await quiet.finish()  # no message and no half-close: input_timeout ends it
    assert (ok.ok, bad.code, first.ok, silent.code) == (True, "BAD_REQUEST", True, "DEADLINE_EXCEEDED")
    for end in ("kill", "disconnect"):
        async with driver.open("held") as exchange:
            await exchange.send({"n": 1})
            await exchange.next_answer()
            await driver.probe.held_event(exchange.request_id).wait()
            await getattr(exchange, end)()
            await driver.idle("held")
    for endpoint in EXCHANGE_ENDPOINTS:
        await driver.idle(endpoint)


def accounting(driver: Any) -> dict[str, Any]:
    handle, transport = driver.handle, driver.transport
    return {
        "requests": samples(handle, "ingress_requests_total", transport, "endpoint", "outcome"),
        "messages": samples(handle, "ingress_exchange_messages_total", transport, "endpoint", "direction"),
    }


async def test_accounting_is_identical_for_the_same_script(exchange_driver):
    """The same script gives the same ingress_requests_total by (endpoint, outcome) and the same
    ingress_exchange_messages_total by (endpoint, direction) as on memory."""
    with trio.fail_after(TEST_TIMEOUT):
        with capture_logs():  # the reference worker's log lines are not this test's business
            async with open_exchange_driver("memory", ExchangeProbe(), WorkerConfig()) as reference:
                await run_script(reference)
                expected = accounting(reference)
        await run_script(exchange_driver)
        measured = accounting(exchange_driver)
    assert expected == EXPECTED
    assert measured == expected
