"""Full-duplex exchanges in the core (runtime/_exchange.py), through the memory transport on the mock
clock: both directions independent, half-close, server-first finish, bounded input, input_timeout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from runtime import Caller, ErrorCode, RequestContext, Worker, open_worker
from runtime.mocker import create_mocker
from runtime.testing import MemoryTransport, RecordingSink, bind_for_test, sample


def _worker(seen: list[Any]) -> Worker:
    worker = Worker("duplex")

    @worker.endpoint("greet_then_echo", duplex=True)
    async def greet_then_echo(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        yield {"hello": True}  # before reading anything
        async for message in messages:
            seen.append(message)
            yield message

    @worker.endpoint("batch", duplex=True)
    async def batch(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        first = [await messages.__anext__(), await messages.__anext__()]  # reads two before it yields
        yield first

    @worker.endpoint("one", duplex=True, max_input_bytes=100)
    async def one(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message
            return  # finishes while the caller may still be sending

    @worker.endpoint("slow", duplex=True, max_input_bytes=100)
    async def slow(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        await trio.sleep(10)  # reads nothing for a while
        async for message in messages:
            yield message

    @worker.endpoint("quiet", duplex=True, input_timeout=5)
    async def quiet(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message

    return worker


async def test_responses_and_messages_flow_independently_and_half_close_ends_the_input(autojump_clock):
    """The handler yields before reading, then echoes; a half-close ends its loop and the exchange."""
    seen: list[Any] = []
    memory = MemoryTransport()
    async with open_worker(_worker(seen), [memory]) as handle:
        call = memory.open("greet_then_echo", b"")
        await call.sink.chunk_sent.wait()
        assert call.sink.chunks == [{"hello": True}]  # out before anything came in
        await call.send({"n": 1})
        await call.send({"n": 2})
        call.end()
        await call.wait_done()
        received = sample(handle.runtime, "ingress_exchange_messages_total", endpoint="greet_then_echo",
                          transport="memory", direction="received")  # fmt: skip
    assert call.sink.chunks == [{"hello": True}, {"n": 1}, {"n": 2}] and call.sink.ended
    assert seen == [{"n": 1}, {"n": 2}] and received == 2


async def test_a_handler_may_read_several_messages_before_it_answers(autojump_clock):
    """Two messages in, then one answer naming both."""
    memory = MemoryTransport()
    async with open_worker(_worker([]), [memory]):
        call = memory.open("batch", b'{"a": 1}')  # the open's payload is the first message
        await call.send({"b": 2})
        await call.wait_done()
    assert call.sink.chunks == [[{"a": 1}, {"b": 2}]] and call.sink.ended


async def test_the_handler_may_finish_first_and_the_rest_of_the_input_is_discarded(autojump_clock):
    """Server-first finish: a clean end; what the caller still sends is dropped, never waits."""
    memory = MemoryTransport()
    async with open_worker(_worker([]), [memory]):
        call = memory.open("one", b'{"x": 1}')
        await call.wait_done()
        for i in range(100):  # far more than max_input_bytes: none of it may block or pile up
            await call.send({"late": i})
    assert call.sink.chunks == [{"x": 1}] and call.sink.ended and call.sink.error is None


async def test_a_caller_that_sends_faster_than_the_handler_reads_is_held_back(autojump_clock):
    """max_input_bytes=100: with the handler not reading, the caller's second 60-byte message waits."""
    memory = MemoryTransport()
    payload = {"pad": "x" * 48}  # 60 bytes of JSON
    async with open_worker(_worker([]), [memory]):
        call = memory.open("slow", b"")
        sent: list[int] = []

        async def sender() -> None:
            for i in range(3):
                await call.send(payload)
                sent.append(i)
            call.end()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == [0]  # the first fits; the second waits for the handler
        await call.wait_done()
    assert call.sink.chunks == [payload] * 3 and call.sink.ended


async def test_a_caller_that_sends_nothing_for_input_timeout_ends_the_exchange(autojump_clock):
    """input_timeout=5: silence from the caller is DEADLINE_EXCEEDED, naming the setting."""
    memory = MemoryTransport()
    async with open_worker(_worker([]), [memory]):
        call = memory.open("quiet", b"")
        await call.wait_done()
    assert call.sink.error is not None and call.sink.error.code is ErrorCode.DEADLINE_EXCEEDED
    assert "input_timeout" in call.sink.error.message


async def test_a_message_that_is_not_json_ends_the_exchange_with_bad_request(autojump_clock):
    """Mid-exchange, an undecodable message is BAD_REQUEST for that exchange, after its output so far."""
    memory = MemoryTransport()
    async with open_worker(_worker([]), [memory]):
        call = memory.open("greet_then_echo", b'{"ok": 1}')
        await call.sink.chunk_sent.wait()
        caller_side = memory._caller.get(0)  # the raw inbox, as a transport sees it
        assert caller_side is not None and caller_side.inbox is not None
        caller_side.inbox.offer(b"{nope")
        await call.wait_done()
    assert call.sink.chunks == [{"hello": True}, {"ok": 1}]
    assert call.sink.error is not None and call.sink.error.code is ErrorCode.BAD_REQUEST


async def test_the_mockers_chat_answers_each_turn_and_ends_after_the_half_close(autojump_clock):
    """chat: n tokens per message, numbered by turn; the exchange ends once the last turn is out."""
    memory = MemoryTransport()
    async with open_worker(create_mocker(), [memory]):
        call = memory.open("chat", json.dumps({"max_tokens": 2}).encode())
        await call.send({"max_tokens": 1, "itl_ms": 5})
        call.end()
        await call.wait_done()
    assert [(c["turn"], c["index"]) for c in call.sink.chunks] == [(0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize(
    "body", [b'{"max_tokens": 1}\n{"max_tokens": 2}\n', b'{"max_tokens": 1}\n\n{"max_tokens": 2}']
)
async def test_a_transport_that_cannot_stream_input_hands_over_ndjson_lines_then_the_end(body):
    """Without streamed input (a body read whole), each NDJSON line is one message, then a half-close."""
    bound = bind_for_test(create_mocker())
    sink = RecordingSink()
    outcome = await Caller(bound.transport).open(1, "chat").run(body, sink)
    assert outcome == "ok" and [(c["turn"], c["index"]) for c in sink.chunks] == [(0, 0), (1, 0), (1, 1)]


async def test_kill_and_disconnect_end_an_exchange_and_its_input_no_longer_waits(autojump_clock):
    """A killed exchange answers CANCELLED; a disconnected one is counted; later sends never block."""
    memory = MemoryTransport()
    async with open_worker(_worker([]), [memory]) as handle:
        killed, gone = memory.open("slow", b""), memory.open("slow", b"")
        await trio.testing.wait_all_tasks_blocked()
        killed.kill()
        gone.disconnect("reset")
        await killed.wait_done()
        await gone.wait_done()
        for _ in range(10):
            await killed.send({"pad": "x" * 80})  # the handler is gone: dropped, not held
        disconnects = sample(
            handle.runtime,
            "ingress_client_disconnects_total",
            endpoint="slow",
            transport="memory",
            reason="reset",
        )
    assert killed.sink.error is not None and killed.sink.error.code is ErrorCode.CANCELLED
    assert gone.sink.error is None and disconnects == 1


async def test_an_exchange_in_flight_continues_through_the_drain_and_new_ones_are_refused(autojump_clock):
    """Phase 1 refuses a new exchange (retryable); the running one goes on until its caller ends it."""
    memory = MemoryTransport()
    async with open_worker(_worker([]), [memory]) as handle:
        running = memory.open("greet_then_echo", b"")
        await running.sink.chunk_sent.wait()
        handle.shutdown("test")
        await handle.wait_intake_closed()
        late = memory.open("greet_then_echo", b"")
        await running.send({"still": "here"})
        running.end()
        await running.wait_done()
        result = await handle.wait_drained()
    assert (
        late.sink.error is not None and late.sink.error.code is ErrorCode.UNAVAILABLE and late.sink.retryable
    )
    assert running.sink.chunks == [{"hello": True}, {"still": "here"}] and running.sink.ended
    assert not result.forced


async def test_over_http_an_ndjson_body_is_the_exchanges_input_until_streaming_input_lands():
    """HTTP (no streamed input yet): POST /v1/chat with NDJSON lines answers every turn as SSE."""
    import httpx

    from transports.http import HttpTransport

    async with open_worker(create_mocker(), [HttpTransport(port=0)]) as handle:
        host, port = handle.addresses["http"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            body = b'{"max_tokens": 2}\n{"max_tokens": 1}\n'
            response = await client.post("/v1/chat", content=body, headers={"accept": "application/x-ndjson"})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert response.status_code == 200 and [(c["turn"], c["index"]) for c in lines] == [
        (0, 0),
        (0, 1),
        (1, 0),
    ]


async def test_over_http1_chunked_answers_stream_out_while_the_body_streams_in():
    """A raw HTTP/1.1 client sends one NDJSON line per chunk and reads each turn before sending the next."""
    from transports.http import HttpTransport

    async def read_until(stream: trio.SocketStream, buffer: bytearray, marker: bytes) -> None:
        while marker not in buffer:
            data = await stream.receive_some()
            assert data, "the worker closed the connection"
            buffer += data

    def chunk(line: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(line), line)

    head = (
        b"POST /v1/chat HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
        b"accept: application/x-ndjson\r\n\r\n"
    )
    with trio.fail_after(20):
        async with (
            open_worker(create_mocker(), [HttpTransport(port=0)]) as handle,
            await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
        ):
            await stream.send_all(head + chunk(b'{"max_tokens": 1}\n'))
            received = bytearray()
            await read_until(stream, received, b'"turn":0')  # answered while the body is still open
            await stream.send_all(chunk(b'{"max_tokens": 2}\n'))
            await read_until(stream, received, b'"turn":1,"index":1')
            await stream.send_all(b"0\r\n\r\n")  # the end of the body: the half-close
            await read_until(stream, received, b"\r\n0\r\n\r\n")  # the end of the response
    assert received.startswith(b"HTTP/1.1 200") and received.count(b'"turn"') == 3


async def test_over_h2_a_streamed_request_body_is_the_exchanges_input():
    """httpx over h2 with a generated body: every line is a message; the answers come back as NDJSON."""
    import httpx

    from transports.http import HttpTransport

    async def body() -> AsyncIterator[bytes]:
        for n in (2, 1):
            yield b'{"max_tokens": %d}\n' % n

    async with open_worker(create_mocker(), [HttpTransport(port=0)]) as handle:
        host, port = handle.addresses["http"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", http1=False, http2=True) as client:
            response = await client.post(
                "/v1/chat", content=body(), headers={"accept": "application/x-ndjson"}
            )
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert response.http_version == "HTTP/2" and [(c["turn"], c["index"]) for c in lines] == [
        (0, 0),
        (0, 1),
        (1, 0),
    ]
