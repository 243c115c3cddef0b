"""Exchanges over TCP (protocol version 2), with real sockets: messages in while answers stream out,
half-close, flow control that holds the caller back, and version-1 clients still served."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from runtime import BadRequest, ErrorCode, RemoteError, RequestContext, Unavailable, Worker, open_worker
from runtime.mocker import create_mocker
from runtime.plugins import run_exchange
from transports.tcp import TcpClient, TcpTransport
from transports.tcp import _protocol as codec

TEST_TIMEOUT = 20


def _worker(reading: trio.Event) -> Worker:
    worker = create_mocker()

    @worker.endpoint("late_reader", duplex=True, max_input_bytes=64)
    async def late_reader(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        await reading.wait()  # takes nothing until the test says so
        async for message in messages:
            yield message

    @worker.endpoint("first_only", duplex=True)
    async def first_only(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message
            return  # finishes while the caller still sends

    return worker


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[tuple[Any, TcpClient]]:
    async with (
        open_worker(worker, [TcpTransport(port=0)]) as handle,
        TcpClient.connect(*handle.addresses["tcp"]) as client,
    ):
        yield handle, client


@asynccontextmanager
async def raw_client(
    worker: Worker, version: int
) -> AsyncIterator[tuple[trio.SocketStream, codec.Connection]]:
    """A hand-driven connection to ``worker`` whose HELLO announces ``version``."""
    async with (
        open_worker(worker, [TcpTransport(port=0)]) as handle,
        await trio.open_tcp_stream(*handle.addresses["tcp"]) as stream,
    ):
        conn = codec.Connection(codec.Role.CLIENT)
        hello = conn.local_hello
        conn.local_hello = codec.Hello(version, hello.max_frame_size, hello.max_streams)
        await stream.send_all(conn.send(conn.local_hello))
        while conn.peer_hello is None:
            conn.receive_data(await stream.receive_some())
            conn.next_event()
        yield stream, conn


async def _events_until(
    stream: trio.SocketStream, conn: codec.Connection, done: Callable[[object], bool]
) -> list[object]:
    events: list[object] = []
    while not any(done(e) for e in events):
        event = conn.next_event()
        if event is codec.NEED_DATA:
            conn.receive_data(await stream.receive_some())
        else:
            events.append(event)
    return events


async def test_answers_stream_out_while_messages_stream_in_and_half_close_ends_it():
    """chat over TCP: each message answered as it arrives; after end(), the last turn, then END."""
    answers = []
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(create_mocker()) as (_, client),
            client.exchange("chat", deadline=math.inf) as chat,
        ):
            await chat.send({"max_tokens": 2})
            async for chunk in chat:
                answers.append((chunk["turn"], chunk["index"]))
                if answers == [(0, 0), (0, 1)]:  # the first turn is out: the next message goes in
                    await chat.send({"max_tokens": 1})
                    await chat.end()
    assert answers == [(0, 0), (0, 1), (1, 0)]


async def test_a_caller_that_sends_faster_than_the_handler_reads_waits_for_credit():
    """max_input_bytes=64: with the handler not reading, send() waits; once it reads, all arrive in order."""
    reading = trio.Event()
    sent: list[int] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(_worker(reading)) as (_, client),
            client.exchange("late_reader", deadline=math.inf) as exchange,
            trio.open_nursery() as nursery,
        ):

            async def sender() -> None:
                for i in range(10):
                    await exchange.send({"i": i, "pad": "x" * 10})  # 26 bytes each
                    sent.append(i)
                await exchange.end()

            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert len(sent) == 2  # 64 bytes of credit: two messages, then it waits
            reading.set()
            answers = [chunk["i"] async for chunk in exchange]
    assert answers == list(range(10)) and sent == list(range(10))


async def test_a_message_larger_than_the_window_is_a_clear_error_not_a_hang():
    """A message bigger than the exchange's whole window can never be sent: BadRequest at once."""
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(_worker(trio.Event())) as (_, client),
            client.exchange("late_reader", deadline=math.inf) as exchange,
        ):
            await exchange.send({})  # opens it; the window is known once the grant arrived
            with pytest.raises(BadRequest, match="window of 64 bytes"):
                await exchange.send({"pad": "x" * 100})


async def _send_until_refused(exchange: Any, count: int) -> None:
    for i in range(count):
        await exchange.send({"late": i})


async def test_the_handler_may_finish_first_and_later_messages_do_not_break_the_connection():
    """Server-first finish: a clean END; sending after it is refused here or dropped there, never more."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_worker(trio.Event())) as (_, client):
            async with client.exchange("first_only", deadline=math.inf) as exchange:
                await exchange.send({"n": 1})
                answers = [chunk async for chunk in exchange]
                with pytest.raises(Unavailable, match="ended"):
                    await _send_until_refused(exchange, 100)
            again = [chunk async for chunk in client.stream("generate", {"max_tokens": 1})]
    assert answers == [{"n": 1}] and len(again) == 1  # the connection serves on


async def test_a_version_1_client_is_served_and_gives_an_exchange_its_whole_input_up_front():
    """An old client (HELLO v1): it is answered at version 1; chat takes the REQUEST as NDJSON lines."""
    body = b'{"max_tokens": 1}\n{"max_tokens": 2}\n'
    with trio.fail_after(TEST_TIMEOUT):
        async with raw_client(create_mocker(), version=1) as (stream, conn):
            await stream.send_all(conn.send(codec.Request(1, "chat", "", 0, (), body)))
            frames = await _events_until(stream, conn, lambda f: isinstance(f, codec.End | codec.Error))
    chunks = [json.loads(f.payload) for f in frames if isinstance(f, codec.Data)]
    assert conn.version == 1 and isinstance(frames[-1], codec.End)
    assert [(c["turn"], c["index"]) for c in chunks] == [(0, 0), (1, 0), (1, 1)]


async def test_killing_an_exchange_mid_way_cancels_it_and_the_connection_goes_on():
    """Leaving the exchange early (KILL) ends it; the same connection then serves another request."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_worker(trio.Event())) as (handle, client):
            async with client.exchange("late_reader", deadline=math.inf) as exchange:
                await exchange.send({"i": 0})
            await handle.binding("tcp", "late_reader").tracker.wait_idle()
            answer = await client.call("echo", {"still": "here"})
    assert answer == {"still": "here"}


async def test_data_on_a_stream_that_is_not_an_exchange_is_a_protocol_error():
    """A client DATA without credit (a plain stream has none) closes that connection with an ERROR."""
    body = b'{"max_tokens": 100000, "itl_ms": 10}'
    with trio.fail_after(TEST_TIMEOUT):
        async with raw_client(create_mocker(), version=2) as (stream, conn):
            request = conn.send(codec.Request(1, "generate", "", 0, (), body))
            await stream.send_all(request + codec.HEADER.pack(2, codec.FrameType.DATA, 1) + b"{}")
            events = await _events_until(
                stream, conn, lambda e: isinstance(e, codec.Error) and not e.stream_id
            )
    error = next(e for e in events if isinstance(e, codec.Error) and e.stream_id == 0)
    assert error.code == ErrorCode.BAD_REQUEST and "flow control" in error.message


async def test_a_first_message_in_the_request_leaves_the_client_exactly_its_window():
    """REQUEST carries 16 bytes: the worker grants the window minus those, and DATA filling it is fine."""
    reading = trio.Event()
    worker = _worker(reading)  # late_reader: max_input_bytes=64, reads once the event is set
    with trio.fail_after(TEST_TIMEOUT):
        async with raw_client(worker, version=2) as (stream, conn):
            first = b'{"first":"msg1"}'  # 16 bytes
            await stream.send_all(conn.send(codec.Request(1, "late_reader", "", 0, (), first)))
            grants = await _events_until(stream, conn, lambda e: isinstance(e, codec.WindowUpdate))
            assert grants == [codec.WindowUpdate(1, 64 - len(first))]
            await stream.send_all(conn.send(codec.Data(1, b'{"pad":"' + b"x" * 38 + b'"}')))  # the rest: 48
            await stream.send_all(conn.send(codec.End(1)))
            reading.set()
            answers = await _events_until(stream, conn, lambda e: isinstance(e, codec.Error | codec.End))
    assert not any(isinstance(e, codec.Error) for e in answers)  # no flow-control error, no close
    assert next(json.loads(e.payload) for e in answers if isinstance(e, codec.Data)) == {"first": "msg1"}


async def test_a_sender_learns_at_once_that_the_exchange_ended_or_was_refused():
    """No reader needed: send() on a refused or ended exchange raises instead of waiting forever."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_worker(trio.Event())) as (_, client):
            refused = client.exchange("nope", deadline=math.inf)
            with pytest.raises(Unavailable, match="ended"):
                await _keep_sending(refused, 3)
            await refused.aclose()
            ended = client.exchange("first_only", deadline=math.inf)
            with pytest.raises(Unavailable, match="ended"):
                await _keep_sending(ended, 10_000)  # far past the window: the END must wake the sender
            await ended.aclose()


async def test_the_cli_exchange_runner_reports_a_refusal_as_itself():
    """run_exchange (ingress call --duplex) on an unknown endpoint: the refusal, not a group of it and
    the sender's "the exchange has ended"."""

    async def messages() -> AsyncIterator[Any]:
        for i in range(100):
            yield {"i": i}

    with trio.fail_after(TEST_TIMEOUT):
        async with serving(create_mocker()) as (_, client):
            for _ in range(5):  # the sender and the reader hear of the end in the same batch
                async with client.exchange("nope", deadline=math.inf) as session:
                    with pytest.raises(RemoteError) as refused:
                        await run_exchange(session, messages(), lambda answer: None)
                assert refused.value.code is ErrorCode.NOT_FOUND


async def _keep_sending(exchange: Any, count: int) -> None:
    for i in range(count):
        await exchange.send({"i": i, "pad": "x" * 100})


async def test_sending_and_reading_from_two_tasks_opens_one_stream():
    """send() and the first iteration racing: one REQUEST, the answers belong to the messages sent."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(create_mocker()) as (handle, client):
            async with client.exchange("chat", deadline=math.inf) as chat, trio.open_nursery() as nursery:
                answers: list[Any] = []

                async def read() -> None:
                    answers.extend([chunk async for chunk in chat])

                nursery.start_soon(read)
                await chat.send({"max_tokens": 1})
                await chat.end()
            assert handle.binding("tcp", "chat").tracker.statistics().started == 1
    assert [(a["turn"], a["index"]) for a in answers] == [(0, 0)]


async def test_a_client_reaches_a_worker_that_speaks_only_version_1():
    """An older worker answers HELLO v1 and refuses ours: TcpClient reconnects at version 1, streams work."""
    served: list[int] = []

    async def old_worker(stream: trio.SocketStream) -> None:
        conn = codec.Connection(codec.Role.SERVER, version=1)
        while (event := conn.next_event()) is codec.NEED_DATA:
            conn.receive_data(await stream.receive_some())
        assert isinstance(event, codec.Hello)
        served.append(event.version)
        await stream.send_all(conn.send(codec.Hello(1, 1 << 20, 128)))
        if event.version != 1:  # what a version-1 worker did with anything else
            await stream.send_all(conn.send(codec.Error(0, 1, False, "unsupported protocol version 2")))
            return
        while not isinstance(event := conn.next_event(), codec.Request):
            conn.receive_data(await stream.receive_some())
        await stream.send_all(
            conn.send_data(event.stream_id, b'"hi"') + conn.send(codec.End(event.stream_id))
        )
        await stream.receive_some()

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, old_worker, 0)
            port = listeners[0].socket.getsockname()[1]
            async with TcpClient.connect("127.0.0.1", port) as client:
                answer = await client.call("echo", {})
                version = client._codec.version
            nursery.cancel_scope.cancel()
    assert answer == "hi" and version == 1 and served == [codec.PROTOCOL_VERSION, 1]


async def test_a_version_2_client_is_served_without_answer_credit():
    """A client that announces 2 never sends WINDOW_UPDATE: its answers flow on TCP's flow control alone."""
    worker = create_mocker()

    @worker.endpoint("big")
    async def big(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        for _ in range(40):
            yield "x" * 65536  # 2.5 MiB in all: more than twice a version-3 client's window

    with trio.fail_after(TEST_TIMEOUT):
        async with raw_client(worker, 2) as (stream, conn):
            assert conn.version == 2
            await stream.send_all(conn.send(codec.Request(1, "big", "", 0, (), b"")))
            events = await _events_until(stream, conn, lambda e: isinstance(e, codec.End | codec.Error))
    assert sum(isinstance(e, codec.Data) for e in events) == 40 and isinstance(events[-1], codec.End)
