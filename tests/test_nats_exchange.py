"""Exchanges over NATS, with a real nats-server: the input on the exchange's own subject, numbered and
within the worker's credit; a raw caller written from docs/protocol-nats.md checks the wire form."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from runtime import BadRequest, ErrorCode, RemoteError, RequestContext, Unavailable, Worker, open_worker
from runtime.mocker import create_mocker
from runtime.testing import nats_server, sample
from transports.nats import NatsClient, NatsTransport
from transports.nats import _aio as aio
from transports.nats._protocol import TailLoss

TEST_TIMEOUT = 20
WINDOW = 64


def _worker(reading: trio.Event) -> Worker:
    worker = create_mocker()

    @worker.endpoint("late_reader", duplex=True, max_input_bytes=WINDOW)
    async def late_reader(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        await reading.wait()  # takes nothing until the test says so
        async for message in messages:
            yield message

    @worker.endpoint("echo_small", duplex=True, max_input_bytes=WINDOW)
    async def echo_small(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message

    @worker.endpoint("echo_wide", duplex=True, max_input_bytes=1024 * 1024)
    async def echo_wide(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message

    @worker.endpoint("first_only", duplex=True)
    async def first_only(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message
            return  # finishes while the caller still sends

    return worker


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[NatsClient]:
    async with (
        nats_server() as url,
        open_worker(worker, [NatsTransport(url)]),
        NatsClient.connect(url, stall_timeout=5) as client,
    ):
        yield client


class RawCaller:
    """A caller built from docs/protocol-nats.md alone, on the client's nats-py connection: it sends
    what it is told, numbered as it is told, with no flow control of its own."""

    def __init__(self, client: NatsClient, claims_sent: int | None = None) -> None:
        self.nc = client._client
        self.replies: trio.MemoryReceiveChannel[Any] | None = None
        self.input = ""
        self.granted = 0
        # What it answers the worker's probes: how many messages it says it sent (None: nothing).
        self.claims_sent = claims_sent

    async def open(self, endpoint: str) -> None:
        send, self.replies = trio.open_memory_channel[Any](math.inf)
        claim = self.claims_sent
        answer = None if claim is None else (lambda: b"%d" % claim)
        inbox, _ = await aio.subscribe_inbox(self.nc, send, None, answer)
        headers = {"Ingress-Input": "stream"}
        await aio.publish_batch(self.nc, [aio.Outgoing(f"ingress.{endpoint}", b"", headers, reply=inbox)])
        first = await self.next_reply()
        assert first.headers["Ingress-Kind"] == "credit"
        self.input, self.granted = first.headers["Ingress-Input"], int(first.headers["Ingress-Credit"])

    async def publish(self, data: bytes, kind: str, seq: int) -> None:
        headers = {"Ingress-Kind": kind, "Ingress-Seq": str(seq)}
        await aio.publish_batch(self.nc, [aio.Outgoing(self.input, data, headers)])

    async def next_reply(self) -> Any:
        assert self.replies is not None
        while True:
            msg = await self.replies.receive()
            if msg.headers.get("Ingress-Kind") != "probe":
                return msg

    async def next_probe(self) -> Any:
        assert self.replies is not None
        while True:
            msg = await self.replies.receive()
            if msg.headers.get("Ingress-Kind") == "probe":
                return msg

    async def outcome(self) -> tuple[list[Any], dict[str, Any] | None]:
        """Every answer until the end, and the error document if it ended with one."""
        answers = []
        while True:
            msg = await self.next_reply()
            kind = msg.headers["Ingress-Kind"]
            if kind == "data":
                answers.append(json.loads(msg.data))
            elif kind == "end":
                return answers, None
            elif kind == "error":
                return answers, json.loads(msg.data)


async def test_answers_stream_out_while_messages_stream_in_and_half_close_ends_it():
    """chat over NATS: each message answered as it arrives; after end(), the last turn, then the end."""
    answers = []
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(create_mocker()) as client, client.exchange("chat", deadline=math.inf) as chat:
            await chat.send({"max_tokens": 2})
            async for chunk in chat:
                answers.append((chunk["turn"], chunk["index"]))
                if answers == [(0, 0), (0, 1)]:  # the first turn is out: the next message goes in
                    await chat.send({"max_tokens": 1})
                    await chat.end()
    assert answers == [(0, 0), (0, 1), (1, 0)]


async def test_a_caller_that_sends_faster_than_the_handler_reads_waits_for_credit():
    """A 64-byte window and a handler not reading: send() waits after two 26-byte messages; once the
    handler reads, all ten arrive in order."""
    reading = trio.Event()
    sent: list[int] = []
    two_sent = trio.Event()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(_worker(reading)) as client,
            client.exchange("late_reader", deadline=math.inf) as exchange,
            trio.open_nursery() as nursery,
        ):

            async def sender() -> None:
                for i in range(10):
                    await exchange.send({"i": i, "pad": "x" * 10})  # 26 bytes each
                    sent.append(i)
                    if len(sent) == 2:
                        two_sent.set()
                await exchange.end()

            nursery.start_soon(sender)
            await two_sent.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
            assert len(sent) == 2  # 64 bytes of credit: two messages, then it waits
            reading.set()
            answers = [chunk["i"] async for chunk in exchange]
    assert answers == list(range(10)) and sent == list(range(10))


async def test_a_message_bigger_than_what_is_left_is_granted_room_once_the_handler_caught_up():
    """7 bytes used, then a 60-byte message in a 64-byte window: the caller says it is blocked and is
    granted what room there is (no deadlock waiting for half a window to come back)."""
    big = {"pad": "x" * 50}
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(_worker(trio.Event())) as client,
            client.exchange("echo_small", deadline=math.inf) as exchange,
        ):
            await exchange.send({"i": 0})
            assert await exchange.__anext__() == {"i": 0}  # consumed: the handler caught up
            await exchange.send(big)
            await exchange.end()
            rest = [chunk async for chunk in exchange]
    assert rest == [big]


async def test_a_message_larger_than_the_window_is_a_clear_error_not_a_hang():
    """A message bigger than the exchange's whole window can never be sent: BadRequest at once."""
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(_worker(trio.Event())) as client,
            client.exchange("echo_small", deadline=math.inf) as exchange,
        ):
            await exchange.send({"i": 0})  # the first grant has told the window
            with pytest.raises(BadRequest, match="window of 64 bytes"):
                await exchange.send({"pad": "x" * 100})


async def test_a_sender_learns_at_once_that_the_exchange_ended_or_was_refused():
    """No reader needed: send() on a refused (no responders) or ended exchange raises, never waits."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_worker(trio.Event())) as client:
            async with client.exchange("nope", deadline=math.inf) as refused:
                with pytest.raises(Unavailable, match="ended"):
                    await _keep_sending(refused, 3)
            async with client.exchange("first_only", deadline=math.inf) as ended:
                with pytest.raises(Unavailable, match="ended"):
                    await _keep_sending(ended, 10_000)  # far past the window: the end must wake it


async def _keep_sending(exchange: Any, count: int) -> None:
    for i in range(count):
        await exchange.send({"i": i, "pad": "x" * 100})


async def test_stop_finishes_an_exchange_early_and_keeps_what_was_made():
    """exchange.stop() mid-turn: the turn stops early with a clean end, not an error."""
    answers = []
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(create_mocker()) as client, client.exchange("chat", deadline=math.inf) as chat:
            await chat.send({"max_tokens": 1000, "itl_ms": 5})
            async for chunk in chat:
                answers.append(chunk)
                if len(answers) == 2:
                    assert await chat.stop()
    assert 2 <= len(answers) < 1000 and [a["index"] for a in answers] == list(range(len(answers)))


async def test_a_burst_of_input_within_credit_is_taken_whole_however_far_behind_trio_is():
    """3,000 messages in one publish (a 1 MiB window allows it) arrive at once: every one is taken, in
    order; none is dropped because the worker's Trio side had not caught up (it once was, past 1,024)."""
    count = 3000
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_worker(trio.Event())) as client:
            raw = RawCaller(client)
            await raw.open("echo_wide")
            messages = [
                aio.Outgoing(raw.input, b"%d" % n, {"Ingress-Kind": "data", "Ingress-Seq": str(n)})
                for n in range(count)
            ]
            end = {"Ingress-Kind": "end", "Ingress-Seq": str(count)}
            await aio.publish_batch(raw.nc, [*messages, aio.Outgoing(raw.input, b"", end)])
            answers, error = await raw.outcome()
    assert error is None and answers == list(range(count))


async def test_a_lost_message_fails_the_exchange_explicitly():
    """A raw caller skips #1: the worker answers UNAVAILABLE, not retryable, naming the gap."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(create_mocker()) as client:
            raw = RawCaller(client)
            await raw.open("chat")
            await raw.publish(b'{"max_tokens": 1}', "data", 0)
            await raw.publish(b'{"max_tokens": 1}', "data", 2)
            answers, error = await raw.outcome()
    assert [a["turn"] for a in answers] == [0]
    assert error is not None and error["code"] == ErrorCode.UNAVAILABLE.name
    assert error["retryable"] is False and "expected #1, got #2" in error["message"]


async def test_a_message_lost_at_the_tail_is_found_by_the_probes():
    """The caller says (answering the worker's probes) that it sent two messages; one arrived and no
    later one can show the gap: a probe interval later the exchange ends UNAVAILABLE, naming the loss."""
    with trio.fail_after(TEST_TIMEOUT):
        async with nats_server() as url:
            transport = NatsTransport(url, caller_check_interval=0.2)
            async with open_worker(create_mocker(), [transport]), NatsClient.connect(url) as client:
                raw = RawCaller(client, claims_sent=2)
                await raw.open("chat")
                await raw.publish(b'{"max_tokens": 1}', "data", 0)  # #1 (say, its end) never arrives
                answers, error = await raw.outcome()
    assert [a["turn"] for a in answers] == [0]
    assert error is not None and error["code"] == ErrorCode.UNAVAILABLE.name
    assert error["retryable"] is False and "2 sent, 1 arrived" in error["message"]


class _Reply:
    """A reply as the caller's reader sees one (nats-py's Msg has these two attributes)."""

    def __init__(self, headers: dict[str, str], data: bytes = b"") -> None:
        self.headers, self.data = headers, data


async def test_a_caller_finds_replies_lost_at_the_tail_from_two_probes():
    """One chunk arrived; two probes in a row say the worker sent 3 and nothing came between them: the
    reader raises UNAVAILABLE naming the loss (not retryable: a chunk was delivered)."""
    from transports.nats._client import _replies

    send, receive = trio.open_memory_channel[Any](math.inf)
    for reply in (
        _Reply({"Ingress-Kind": "data", "Ingress-Seq": "0"}, b'{"i": 0}'),
        _Reply({"Ingress-Kind": "probe", "Ingress-Sent": "3"}),
        _Reply({"Ingress-Kind": "probe", "Ingress-Sent": "3"}),
    ):
        send.send_nowait(reply)
    received: list[Any] = []

    async def read_all() -> None:
        async for chunk in _replies(receive, stall_timeout=10):
            received.append(chunk)

    with pytest.raises(RemoteError) as lost:
        await read_all()
    assert received == [{"i": 0}] and lost.value.code is ErrorCode.UNAVAILABLE
    assert lost.value.retryable is False and "3 sent, 1 arrived" in lost.value.message


def test_a_slow_message_is_not_taken_for_lost():
    """TailLoss: what arrived since the last probe, or what was sent only since, is not a loss."""
    tail = TailLoss()
    assert tail.probed(sent=3, arrived=1) is None  # the first probe only records
    assert tail.probed(sent=5, arrived=2) is None  # one arrived since: still moving
    assert tail.probed(sent=5, arrived=3) is None  # and another
    assert tail.probed(sent=5, arrived=3) == "5 sent, 3 arrived"  # nothing since: lost


async def test_a_lost_grant_is_made_good_by_the_next_probe():
    """The worker's probes carry its current grant: a caller that missed the grant (here: never read
    it) learns its credit from a probe all the same."""
    with trio.fail_after(TEST_TIMEOUT):
        async with nats_server() as url:
            transport = NatsTransport(url, caller_check_interval=0.2)
            async with open_worker(create_mocker(), [transport]), NatsClient.connect(url) as client:
                raw = RawCaller(client)
                await raw.open("chat")  # takes the first grant
                probe = await raw.next_probe()
    assert probe.headers["Ingress-Credit"] == str(raw.granted) and probe.headers["Ingress-Input"] == raw.input


async def test_a_caller_that_ignores_its_credit_gets_bad_request():
    """A raw caller sends past the window the worker granted: BAD_REQUEST naming flow control."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_worker(trio.Event())) as client:
            raw = RawCaller(client)
            await raw.open("late_reader")
            assert raw.granted == WINDOW
            await raw.publish(b'"' + b"x" * (WINDOW - 2) + b'"', "data", 0)  # all of it
            await raw.publish(b"1", "data", 1)  # one byte too many
            answers, error = await raw.outcome()
    assert answers == [] and error is not None
    assert error["code"] == ErrorCode.BAD_REQUEST.name and "flow control" in error["message"]


async def test_a_caller_vanishing_mid_exchange_is_noticed_and_its_handler_cancelled():
    """The exchange's caller leaves without a word: the worker's probe finds its inbox gone."""
    reading = trio.Event()
    with trio.fail_after(TEST_TIMEOUT):
        async with nats_server() as url:
            transport = NatsTransport(url, caller_check_interval=0.2)
            async with open_worker(_worker(reading), [transport]) as handle:
                async with NatsClient.connect(url) as client:
                    raw = RawCaller(client)
                    await raw.open("late_reader")
                # The client's connection is closed: nobody listens on the inbox any more.
                await handle.binding("nats", "late_reader").tracker.wait_idle()
                labels = {"endpoint": "late_reader", "transport": "nats", "reason": "gone"}
                gone = sample(handle.runtime, "ingress_client_disconnects_total", **labels)
    assert gone == 1  # its handler (still waiting to read) was cancelled and counted, not left running
