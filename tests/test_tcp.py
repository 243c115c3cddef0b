"""The TCP transport over real loopback sockets: multiplexing, disconnects, limits, back-pressure, drain."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from runtime import ErrorCode, IngressError, RemoteError, RequestContext, Worker, WorkerConfig, open_worker
from runtime.testing import accepted_sockets, keepalive_settings, sample
from transports.tcp import TcpClient, TcpTransport
from transports.tcp import _protocol as codec


@dataclass
class Probe:
    """What the test endpoints report back: when a handler started, and when it was torn down."""

    started: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    produced: int = 0
    cancelled: bool = False


def _worker(probe: Probe) -> Worker:
    worker = Worker("tcp-test")

    @worker.endpoint("tokens")
    async def tokens(request, ctx: RequestContext):
        probe.started.set()
        try:
            for i in range(request.get("n", 10)):
                if ctx.is_stopped:
                    return
                await trio.sleep(request.get("gap", 0))
                probe.produced += 1
                yield {"i": i, "pad": "x" * request.get("pad", 0)}
        except trio.Cancelled:
            probe.cancelled = True
            raise
        finally:
            probe.finished.set()

    @worker.endpoint("sizes")
    async def sizes(request, ctx: RequestContext):
        for size in request:
            yield "x" * size  # a JSON string: size + 2 bytes on the wire

    @worker.endpoint("context")
    async def context(request, ctx: RequestContext):
        return {
            "remaining": min(ctx.time_remaining(), 1e9),  # JSON has no Infinity
            "metadata": dict(ctx.metadata),
            "peer": ctx.peer,
            "id": ctx.id,
        }

    return worker


@asynccontextmanager
async def serving(probe: Probe, **transport_options) -> AsyncIterator[tuple[object, tuple[str, int]]]:
    transport = TcpTransport(port=0, **transport_options)
    async with open_worker(_worker(probe), [transport], WorkerConfig(drain_timeout=10)) as handle:
        yield handle, handle.addresses["tcp"]


@asynccontextmanager
async def raw_connection(
    address: tuple[str, int], version: int = codec.PROTOCOL_VERSION
) -> AsyncIterator[tuple[trio.SocketStream, codec.Connection]]:
    """A hand-driven client connection, for sending exactly the frames a test needs."""
    async with await trio.open_tcp_stream(*address) as stream:
        conn = codec.Connection(codec.Role.CLIENT, version=version)
        await stream.send_all(conn.send(conn.local_hello))
        while conn.peer_hello is None:
            conn.receive_data(await stream.receive_some(65536))
            conn.next_event()
        yield stream, conn


async def _raw_events(stream: trio.SocketStream, conn: codec.Connection, until: type) -> list[object]:
    """Read events until one of type ``until``; each answer's credit goes back as it is read (v3)."""
    events: list[object] = []
    while not any(isinstance(e, until) for e in events):
        event = conn.next_event()
        if event is codec.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        events.append(event)
        if isinstance(event, codec.Data) and event.payload:
            await stream.send_all(conn.send(codec.WindowUpdate(event.stream_id, len(event.payload))))
    return events


async def test_many_streams_share_one_connection_in_order():
    """Fifty concurrent streams multiplexed on one connection each get all their chunks, in order."""
    async with serving(Probe()) as (handle, address), TcpClient.connect(*address) as client:
        results: dict[int, list[int]] = {}

        async def one(k: int) -> None:
            results[k] = [c["i"] async for c in client.stream("tokens", {"n": 20 + k})]

        async with trio.open_nursery() as nursery:
            for k in range(50):
                nursery.start_soon(one, k)
    assert all(results[k] == list(range(20 + k)) for k in range(50))
    assert handle.statistics().in_flight == 0 and handle.statistics().started == 50


async def test_sockets_have_tcp_nodelay():
    """The client's socket has TCP_NODELAY (trio sets it on every SocketStream, server side included)."""
    async with serving(Probe()) as (_, address), TcpClient.connect(*address) as client:
        assert client._stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_deadline_and_metadata_reach_the_handler():
    """The caller's cancel-scope deadline becomes ctx.deadline; metadata (but a credential) and a request
    id arrive intact."""
    async with serving(Probe()) as (_, address), TcpClient.connect(*address) as client:
        with trio.move_on_after(5):
            answer = await client.call(
                "context", {}, metadata={"trace": "t", "authorization": "Bearer t"}, request_id="rid-1"
            )
    assert 4 < answer["remaining"] <= 5
    assert answer["metadata"] == {"trace": "t"} and answer["id"] == "rid-1"
    assert answer["peer"].startswith("127.0.0.1:")


@pytest.mark.parametrize("how", ["closed", "reset"])
async def test_disconnect_cancels_the_handler_and_is_counted(how):
    """A connection closed or reset mid-stream cancels its handler promptly and counts the reason."""
    probe = Probe()
    async with serving(probe) as (handle, address), raw_connection(address) as (stream, conn):
        await stream.send_all(
            conn.send(codec.Request(1, "tokens", "r", 0, (), b'{"n": 100000, "gap": 0.01}'))
        )
        await probe.started.wait()
        if how == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
        with trio.fail_after(5):
            await probe.finished.wait()
        assert probe.cancelled
        binding = handle.binding("tcp", "tokens")
        await binding.tracker.wait_idle()
        labels = {"endpoint": "tokens", "transport": "tcp"}
        assert sample(handle.runtime, "ingress_client_disconnects_total", **labels, reason=how) == 1
        assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="disconnected") == 1


async def test_leaving_the_loop_early_kills_the_stream():
    """Breaking out of `async for` sends KILL: the worker's handler is cancelled, counted as cancelled."""
    probe = Probe()
    async with serving(probe) as (handle, address), TcpClient.connect(*address) as client:
        async for chunk in client.stream("tokens", {"n": 100000, "gap": 0.001}):
            if chunk["i"] == 2:
                break
        with trio.fail_after(5):
            await probe.finished.wait()
        await handle.binding("tcp", "tokens").tracker.wait_idle()
        assert probe.cancelled
        assert (
            sample(
                handle.runtime,
                "ingress_requests_total",
                endpoint="tokens",
                transport="tcp",
                outcome="cancelled",
            )
            == 1
        )


async def test_stop_ends_the_stream_gracefully():
    """stop() makes the worker finish early with a normal end of stream, not an error."""
    probe = Probe()
    async with serving(probe) as (_, address), TcpClient.connect(*address) as client:
        received = []
        stream = client.stream("tokens", {"n": 100000, "gap": 0.001})
        async for chunk in stream:
            received.append(chunk["i"])
            if chunk["i"] == 2:
                stream.stop()
    assert 3 <= len(received) < 100000 and received == list(range(len(received)))
    assert not probe.cancelled


async def test_errors_reach_the_caller_without_disturbing_other_streams():
    """Unknown endpoint and invalid JSON each fail their own stream; a neighbour stream completes."""
    async with serving(Probe()) as (_, address), raw_connection(address) as (stream, conn):
        frames = [
            codec.Request(1, "tokens", "ok", 0, (), b'{"n": 3, "gap": 0.01}'),
            codec.Request(2, "missing", "nf", 0, (), b"{}"),
            codec.Request(3, "tokens", "bad", 0, (), b"{not json"),
        ]
        await stream.send_all(b"".join(conn.send(f) for f in frames))
        events = []
        while (
            not any(isinstance(e, codec.End) for e in events)
            or len([e for e in events if isinstance(e, codec.Error)]) < 2
        ):
            events += await _raw_events(stream, conn, codec.Error | codec.End)
        errors = {e.stream_id: e for e in events if isinstance(e, codec.Error)}
        assert errors[2].code == ErrorCode.NOT_FOUND and "missing" in errors[2].message
        assert errors[3].code == ErrorCode.BAD_REQUEST and "not valid JSON" in errors[3].message
        assert [json.loads(e.payload)["i"] for e in events if isinstance(e, codec.Data)] == [0, 1, 2]


async def test_malformed_input_closes_only_that_connection():
    """Garbage on one connection gets a protocol ERROR and a close; a stream on another connection goes on."""
    async with serving(Probe()) as (handle, address), TcpClient.connect(*address) as good:
        survivor = good.stream("tokens", {"n": 50, "gap": 0.01})
        first = await survivor.__anext__()
        async with raw_connection(address) as (bad, conn):
            await bad.send_all(struct.pack("!IBI", 3, 99, 1) + b"abc")
            events = await _raw_events(bad, conn, codec.Error | codec.ConnectionClosed)
            assert isinstance(events[0], codec.Error) and events[0].stream_id == 0
            assert "unknown frame type 99" in events[0].message
            rest = [c["i"] async for c in survivor]
            assert [first["i"], *rest] == list(range(50))
            assert sample(handle.runtime, "ingress_protocol_errors_total", transport="tcp") == 1


async def test_stream_limit_refuses_extra_streams_as_retryable():
    """Past max_streams_per_connection a new stream is refused OVERLOADED (retryable); the rest go on."""
    async with (
        serving(Probe(), max_streams_per_connection=2) as (_, address),
        raw_connection(address) as (stream, conn),
    ):
        assert conn.peer_hello is not None and conn.peer_hello.max_streams == 2
        requests = [codec.Request(i, "tokens", "", 0, (), b'{"n": 2, "gap": 0.05}') for i in (1, 2, 3)]
        await stream.send_all(b"".join(conn.send(r) for r in requests))
        events = await _raw_events(stream, conn, codec.Error)
        refused = [e for e in events if isinstance(e, codec.Error)]
        assert refused[0].stream_id == 3 and refused[0].code == ErrorCode.OVERLOADED and refused[0].retryable


async def test_oversized_frame_is_a_protocol_error():
    """A frame larger than max_frame_size closes the connection with a protocol error that names the limit."""
    async with (
        serving(Probe(), max_frame_size=4096) as (_, address),
        raw_connection(address) as (stream, conn),
    ):
        await stream.send_all(struct.pack("!IBI", 100_000, codec.FrameType.REQUEST, 1))
        events = await _raw_events(stream, conn, codec.Error)
        assert "exceeds the limit of 4096" in events[-1].message


async def test_slow_reader_gets_back_pressure_not_buffering():
    """A caller that stops reading stalls its own handler after a bounded amount; then gets everything."""
    probe = Probe()
    async with (
        serving(probe, write_high_water=64 * 1024) as (_, address),
        raw_connection(address) as (stream, conn),
    ):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await stream.send_all(conn.send(codec.Request(1, "tokens", "", 0, (), b'{"n": 2000, "pad": 65536}')))
        await probe.started.wait()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        stalled_at = probe.produced
        # 2000 chunks of 64 KiB is 128 MiB; kernel buffers plus our high-water mark hold a few MiB.
        assert stalled_at < 200
        events = await _raw_events(stream, conn, codec.End)
    assert len([e for e in events if isinstance(e, codec.Data)]) == 2000


async def test_a_stream_left_unread_holds_back_its_own_handler_and_no_sibling():
    """Version 3 answer credit: an unread stream's handler stops at one window (twice the client's frame
    limit); a sibling on the same connection still completes, and leaving the unread one is clean."""
    probe = Probe()
    with trio.fail_after(20):
        async with (
            serving(probe) as (_, address),
            TcpClient.connect(*address, max_frame_size=256 * 1024) as client,
        ):
            unread = client.stream("tokens", {"n": 2000, "pad": 16 * 1024})
            async with unread:
                await unread.__anext__()  # open, and take one chunk (16 KiB, not enough to return credit)
                for _ in range(3):  # siblings complete while the unread stream is stalled
                    assert (await client.call("context"))["peer"]
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                stalled_at = probe.produced
            assert (await client.call("context"))["peer"]  # leaving it did not lose the connection
    # 512 KiB of window: about 32 chunks of 16 KiB, not 2000 (and not the 256-chunk client buffer)
    assert 24 <= stalled_at <= 33


async def test_chunks_of_any_size_up_to_the_frame_limit_never_wait_on_credit_held_back():
    """A client returns credit in halves, so it may hold back up to half the window: a full-frame chunk
    after a smaller one still fits (the window is twice the frame limit); one past the limit is INTERNAL
    at once, not a wait."""
    probe = Probe()
    with trio.fail_after(20):
        async with serving(probe) as (_, address), TcpClient.connect(*address, max_frame_size=4096) as client:
            chunks = [len(c) async for c in client.stream("sizes", [3000, 4094, 4094, 10])]
            with pytest.raises(RemoteError) as error:
                await client.call("sizes", [5000])
    assert chunks == [3000, 4094, 4094, 10]
    assert error.value.code is ErrorCode.INTERNAL and "frame limit" in error.value.message


async def test_drain_refuses_new_streams_and_connections_but_finishes_running_ones():
    """Phase 1: GOAWAY, new streams UNAVAILABLE, new connections refused; running streams finish."""
    probe = Probe()
    async with serving(probe) as (handle, address), raw_connection(address) as (stream, conn):
        await stream.send_all(conn.send(codec.Request(1, "tokens", "", 0, (), b'{"n": 30, "gap": 0.02}')))
        await probe.started.wait()
        handle.shutdown("test")
        goaway = await _raw_events(stream, conn, codec.GoAway)
        await stream.send_all(conn.send(codec.Request(2, "tokens", "", 0, (), b"{}")))
        events = goaway + await _raw_events(stream, conn, codec.End)
        refused = [e for e in events if isinstance(e, codec.Error)]
        assert (
            refused
            and refused[0].stream_id == 2
            and refused[0].code == ErrorCode.UNAVAILABLE
            and refused[0].retryable
        )
        assert len([e for e in events if isinstance(e, codec.Data) and e.stream_id == 1]) == 30
        with pytest.raises(IngressError) as caught:
            async with TcpClient.connect(*address):
                pass
        assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
        result = await handle.wait_drained()
    assert not result.forced


async def test_client_refuses_new_streams_after_goaway():
    """After GOAWAY the client fails new streams locally with a retryable UNAVAILABLE."""
    probe = Probe()
    async with serving(probe) as (handle, address), TcpClient.connect(*address) as client:
        running = client.stream("tokens", {"n": 20, "gap": 0.02})
        await running.__anext__()
        handle.shutdown("test")
        with trio.fail_after(5):
            goaway = await client.wait_goaway()
        assert "draining" in goaway.message
        with pytest.raises(IngressError) as caught:
            await client.call("context")
        assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
        assert len([c async for c in running]) == 19


@asynccontextmanager
async def fake_worker(answer: bytes, *, then_close: bool) -> AsyncIterator[tuple[str, int]]:
    """A listener that reads the client's HELLO, writes ``answer`` in one write, then closes the
    connection or holds it open in silence: a worker as a client may meet it, not as it should be."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        if answer:
            await stream.send_all(answer)
        if not then_close:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def test_a_worker_that_closes_before_its_hello_fails_the_connect_retryably():
    """A close instead of a HELLO (a worker past its drain) is a retryable UNAVAILABLE, not a spin."""
    async with fake_worker(b"", then_close=True) as address:
        with trio.fail_after(5), pytest.raises(IngressError) as caught:
            async with TcpClient.connect(*address):
                pass
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
    assert "before its HELLO" in caught.value.message


async def test_a_silent_worker_fails_the_connect_after_the_handshake_timeout(autojump_clock):
    """A peer that accepts and never says HELLO holds the caller for the handshake timeout only."""
    async with fake_worker(b"", then_close=False) as address:
        start = trio.current_time()
        with pytest.raises(IngressError) as caught:
            async with TcpClient.connect(*address):
                pass
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
    assert trio.current_time() - start == pytest.approx(10.0, abs=0.5)
    assert "did not answer the handshake within 10 s" in caught.value.message


async def test_a_goaway_in_the_same_write_as_the_hello_is_seen_without_more_bytes():
    """Frames that came with the worker's HELLO reach the client before it reads again."""
    server, client_codec = codec.Connection(codec.Role.SERVER), codec.Connection(codec.Role.CLIENT)
    server.receive_data(client_codec.send(client_codec.local_hello))
    assert isinstance(server.next_event(), codec.Hello)
    answer = server.send(server.local_hello) + server.send(codec.GoAway(0, "draining"))
    async with fake_worker(answer, then_close=False) as address, TcpClient.connect(*address) as client:
        with trio.fail_after(5):
            goaway = await client.wait_goaway()
    assert goaway.message == "draining"


async def test_a_handler_whose_chunks_are_all_ready_lets_a_new_stream_start_before_it_ends():
    """A stream that never waits yields every few chunks, so a new stream's handler starts meanwhile."""
    log: list[str] = []
    worker = Worker("yield-test")
    second_request = bytearray()
    client_socket: list[trio.socket.SocketType] = []

    @worker.endpoint("busy")
    async def busy(request, ctx: RequestContext):
        for index in range(200):
            if index == 1:  # the second stream's REQUEST reaches the worker while this one runs
                os.write(client_socket[0].fileno(), second_request)
            log.append(f"busy {index}")
            yield index  # never awaits: the connection has room for every chunk

    @worker.endpoint("second")
    async def second(request, ctx: RequestContext):
        log.append("second started")
        yield "hello"

    transport = TcpTransport(port=0)
    async with (
        open_worker(worker, [transport], WorkerConfig(drain_timeout=5)) as handle,
        raw_connection(handle.addresses["tcp"]) as (stream, conn),
    ):
        client_socket.append(stream.socket)
        first_request = conn.send(codec.Request(1, "busy", "", 0, (), b"null"))
        second_request += conn.send(codec.Request(3, "second", "", 0, (), b"null"))
        await stream.send_all(first_request)
        ended: set[int] = set()
        with trio.fail_after(5):
            while ended != {1, 3}:
                conn.receive_data(await stream.receive_some(65536))
                while (event := conn.next_event()) is not codec.NEED_DATA:
                    if isinstance(event, codec.End):
                        ended.add(event.stream_id)
    started_at = log.index("second started")
    assert started_at < log.index("busy 100"), f"the new stream waited for {started_at} busy chunks"


async def test_huge_non_ascii_endpoint_name_gets_an_error_not_a_crash():
    """An error message echoing hostile input still fits the caller's smallest frame; the worker survives."""
    async with serving(Probe()) as (_, address), TcpClient.connect(*address) as client:
        with pytest.raises(RemoteError) as caught:
            await client.call("é" * 30000)
        assert caught.value.code is ErrorCode.NOT_FOUND
        assert len(caught.value.message.encode()) < codec.MIN_MAX_FRAME_SIZE
        assert await client.call("context") is not None  # same connection, still serving


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="keepalive timings are Linux options")
async def test_both_ends_probe_a_silent_peer_with_tcp_keepalive():
    """Server and client sockets get kernel keepalive with the configured timings; None leaves it off."""
    async with (
        serving(Probe(), keepalive=12) as (_, address),
        TcpClient.connect(*address, keepalive=9) as client,
        TcpClient.connect(*address, keepalive=None) as plain,
    ):
        assert await client.call("context") and await plain.call("context")  # both connections served
        [served, *_] = accepted_sockets(address[1])
        assert keepalive_settings(served) == (1, 12, 4, 3)
        assert keepalive_settings(client._stream.socket) == (1, 9, 3, 3)
        assert plain._stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def _client_ready_to_send() -> codec.Connection:
    """A client codec that has seen a server HELLO, so it encodes frames before any socket exists."""
    client = codec.Connection(codec.Role.CLIENT)
    server = codec.Connection(codec.Role.SERVER)
    client.receive_data(server.send(server.local_hello))
    assert isinstance(client.next_event(), codec.Hello)
    return client


async def test_hello_and_first_request_in_one_write_are_answered_without_more_bytes():
    """Frames that arrive in the same segment as the HELLO are served; the client sends nothing more."""
    request = codec.Request(1, "tokens", "r1", 0, (), b'{"n": 2}')
    encoder = _client_ready_to_send()
    one_write = encoder.send(encoder.local_hello) + encoder.send(request)
    async with serving(Probe()) as (_, address), await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(one_write)
        reader = _reading_client()
        with trio.fail_after(10):
            await _raw_events(stream, reader, codec.Hello)
            reader.send(request)  # already on the wire: this only opens stream 1 in the reader's state
            events = await _raw_events(stream, reader, codec.End)
    assert [json.loads(e.payload)["i"] for e in events if isinstance(e, codec.Data)] == [0, 1]


def _reading_client() -> codec.Connection:
    """A client codec used only to parse what the server sends (its own HELLO went out by hand)."""
    reader = codec.Connection(codec.Role.CLIENT)
    reader.send(reader.local_hello)
    return reader


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ((0, 1 << 20, 128), "unsupported protocol version 0"),
        ((1, 100, 128), "frame limit below 1024"),
        ((1, 1 << 20, 0), "no streams"),
    ],
    ids=["version", "frame-limit", "no-streams"],
)
async def test_a_bad_hello_gets_the_servers_hello_and_a_connection_error_before_the_close(fields, says):
    """A wrong version or out-of-range limits are answered with HELLO + ERROR on stream 0, then EOF."""
    bad_hello = codec.MAGIC + codec.HEADER.pack(10, codec.FrameType.HELLO, 0) + struct.pack("!HII", *fields)
    async with serving(Probe()) as (_, address), await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(bad_hello)
        with trio.fail_after(10):
            events = await _raw_events(stream, _reading_client(), codec.ConnectionClosed)
    assert isinstance(events[0], codec.Hello) and events[0].version == codec.PROTOCOL_VERSION
    error = events[1]
    assert isinstance(error, codec.Error) and error.stream_id == 0 and error.code == ErrorCode.BAD_REQUEST
    assert says in error.message


def test_a_refusal_fits_any_peer_and_keeps_its_text_valid_utf8():
    """send_refusal cuts a long message on a character boundary so the smallest peer limit takes it."""
    server = codec.Connection(codec.Role.SERVER)
    client = _reading_client()
    client.receive_data(server.send_refusal(codec.Error(0, ErrorCode.BAD_REQUEST, False, "é" * 5000)))
    assert isinstance(client.next_event(), codec.Hello)
    error = client.next_event()
    assert isinstance(error, codec.Error) and 0 < len(error.message.encode()) <= 1021
    assert set(error.message) == {"é"}


async def test_a_burst_of_1024_connections_is_accepted_and_every_one_handshakes():
    """1,024 clients connecting at once all complete the handshake: the backlog holds the burst."""
    done = 0

    async def handshake(address: tuple[str, int]) -> None:
        nonlocal done
        async with raw_connection(address):
            done += 1

    async with serving(Probe()) as (_, address):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(1024):
                    nursery.start_soon(handshake, address)
    assert done == 1024


async def test_connect_and_close_is_no_protocol_error():
    """A TCP health check (connect, then close without a byte) is not counted or logged as an error."""
    async with serving(Probe()) as (handle, address):
        for _ in range(5):
            async with await trio.open_tcp_stream(*address) as stream:
                await stream.send_eof()  # nothing sent; the server's close tells us it has judged it
                while await stream.receive_some(65536):
                    pass
    assert sample(handle.runtime, "ingress_protocol_errors_total", transport="tcp") == 0
