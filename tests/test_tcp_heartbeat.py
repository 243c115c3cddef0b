"""TCP protocol version 4: PING/PONG, the worker's load report in its PONG, and the heartbeat both ways."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from test_tcp import Probe, raw_connection, serving

from runtime import BadRequest, ErrorCode, IngressError
from runtime.testing import sample
from transports.tcp import TcpClient
from transports.tcp import _protocol as codec
from transports.tcp._client import _load_report

TEST_TIMEOUT = 10


def _pair(client_version: int = codec.PROTOCOL_VERSION) -> tuple[codec.Connection, codec.Connection]:
    client = codec.Connection(codec.Role.CLIENT, version=client_version)
    server = codec.Connection(codec.Role.SERVER)
    server.receive_data(client.send(client.local_hello))
    server.next_event()
    client.receive_data(server.send(server.local_hello))
    client.next_event()
    return client, server


def _next(conn: codec.Connection) -> object:
    return conn.next_event()


def test_ping_and_pong_round_trip_both_ways_with_the_report():
    """Either side may PING; the PONG echoes the 8 opaque bytes, and the worker's carries its report."""
    client, server = _pair()
    server.receive_data(client.send(codec.Ping(b"abcdefgh")))
    assert _next(server) == codec.Ping(b"abcdefgh")
    client.receive_data(server.send(codec.Pong(b"abcdefgh", b'{"phase":"serving"}')))
    assert _next(client) == codec.Pong(b"abcdefgh", b'{"phase":"serving"}')
    client.receive_data(server.send(codec.Ping(b"12345678")))
    assert _next(client) == codec.Ping(b"12345678")
    server.receive_data(client.send(codec.Pong(b"12345678")))
    assert _next(server) == codec.Pong(b"12345678", b"")


@pytest.mark.parametrize("client_version", [1, 2, 3])
def test_before_version_4_ping_is_refused_where_it_is_made_and_where_it_arrives(client_version):
    """An older peer would not understand PING: neither side sends one, and one that arrives is an error."""
    _, server = _pair(client_version)
    assert server.version == client_version
    with pytest.raises(codec.LocalProtocolError, match="version 4"):
        server.send(codec.Ping(b"abcdefgh"))
    server.receive_data(codec.HEADER.pack(8, codec.FrameType.PING, 0) + b"abcdefgh")
    with pytest.raises(codec.RemoteProtocolError, match="version 4"):
        _next(server)


@pytest.mark.parametrize(
    ("frame_type", "stream_id", "payload", "says"),
    [
        (codec.FrameType.PING, 0, b"short", "exactly 8"),
        (codec.FrameType.PING, 0, b"123456789", "exactly 8"),
        (codec.FrameType.PONG, 0, b"1234567", "starts with the 8"),
        (codec.FrameType.PING, 1, b"12345678", "only allowed on stream 0"),
        (codec.FrameType.PONG, 3, b"12345678", "only allowed on stream 0"),
    ],
)
def test_a_malformed_ping_or_pong_is_a_protocol_error(frame_type, stream_id, payload, says):
    """8 opaque bytes on stream 0: anything else is refused with a message that says so."""
    _, server = _pair()
    server.receive_data(codec.HEADER.pack(len(payload), frame_type, stream_id) + payload)
    with pytest.raises(codec.RemoteProtocolError, match=says):
        _next(server)


async def test_a_raw_client_gets_a_pong_with_the_workers_load_report():
    """Written from docs/protocol-tcp.md: PING on stream 0, PONG with the same bytes and the /status JSON."""
    probe = Probe()
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(probe) as (_, address), raw_connection(address) as (stream, conn):
            await stream.send_all(conn.send(codec.Request(1, "tokens", "", 0, (), b'{"n":1,"gap":60}')))
            await probe.started.wait()
            await stream.send_all(conn.send(codec.Ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")))
            pong = await _read_until(stream, conn, codec.Pong)
    assert pong.opaque == b"\x00\x01\x02\x03\x04\x05\x06\x07"
    report = json.loads(pong.report)
    assert report["worker"] == "tcp-test" and report["phase"] == "serving" and report["ready"] is True
    assert report["endpoints"]["tokens"]["running"] == 1 and report["in_flight"] == 1


async def test_client_ping_returns_the_report_and_keeps_it_as_the_clients_load():
    """``await client.ping()`` answers with the worker's status, each PONG kept as ``client.load``."""
    probe = Probe()
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(probe) as (_, address), TcpClient.connect(*address) as client:
            assert client.load is None
            report = await client.ping()
    assert report is not None and report["endpoints"]["tokens"]["running"] == 0
    assert client.load == report and client.load_received_at is not None


@asynccontextmanager
async def hung_worker() -> AsyncIterator[tuple[str, int]]:
    """A worker that answers the handshake at version 4 and then hangs: its kernel still holds the
    connection, nothing more ever comes."""

    async def handler(stream: trio.SocketStream) -> None:
        conn = codec.Connection(codec.Role.SERVER)
        while not isinstance(conn.next_event(), codec.Hello):
            conn.receive_data(await stream.receive_some(65536))
        await stream.send_all(conn.send(conn.local_hello))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def test_a_hung_worker_fails_the_stream_after_the_heartbeat_timeout(autojump_clock):
    """No PONG within the timeout: the open stream ends UNAVAILABLE (retryable, no chunk came) on time."""
    async with hung_worker() as address, TcpClient.connect(*address) as client:
        start = trio.current_time()
        with pytest.raises(IngressError) as caught:
            await client.call("echo", {})
        took = trio.current_time() - start
        assert not client.usable
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
    assert "did not answer a PING within 20 s" in caught.value.message
    assert took == pytest.approx(10.0 + 20.0, abs=0.5)  # the first PING, then its whole timeout


async def test_a_hung_version_4_client_is_closed_and_its_handler_cancelled(autojump_clock):
    """A silent v4 client is pinged, then dropped (disconnect ``heartbeat``); a silent v3 one is kept."""
    probe = Probe()
    async with serving(probe, heartbeat_interval=15) as (handle, address):
        async with (
            raw_connection(address, version=3) as (old, old_conn),
            raw_connection(address) as (
                hung,
                hung_conn,
            ),
        ):
            request = codec.Request(1, "tokens", "", 0, (), b'{"n":1,"gap":1e6}')
            await hung.send_all(hung_conn.send(request))
            await probe.finished.wait()
            events = await _read_until(hung, hung_conn, codec.ConnectionClosed)
            await old.send_all(old_conn.send(codec.Request(1, "context", "", 0, (), b"")))
            closed_at = trio.current_time()
            answer = await _read_until(old, old_conn, codec.End)
        labels = {"endpoint": "tokens", "transport": "tcp", "reason": "heartbeat"}
        disconnects = sample(handle.runtime, "ingress_client_disconnects_total", **labels)
    assert probe.cancelled and disconnects == 1
    assert [type(e) for e in events] == [codec.Ping, codec.ConnectionClosed]
    assert answer == codec.End(1)  # the silent v3 client outlived the three sweeps
    assert closed_at == pytest.approx(45, abs=1)  # silent at 15 s, pinged at 30 s, closed at 45 s


async def test_the_client_answers_the_workers_pings_without_a_heartbeat_of_its_own():
    """A TcpClient that never pings still answers the worker's PINGs: it outlives a hung neighbour."""
    probe = Probe()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(probe, heartbeat_interval=0.5) as (_, address),
            TcpClient.connect(*address, heartbeat_interval=None) as client,
            raw_connection(address) as (hung, hung_conn),
        ):
            await _read_until(hung, hung_conn, codec.ConnectionClosed)  # two to three sweeps
            answer = await client.call("context")
            usable = client.usable
    assert usable and answer["peer"]


def test_a_load_report_a_client_cannot_trust_is_no_report():
    """Reports of the wrong shape or types, or nested past the parser, are ignored, not crashed on."""
    assert _load_report(b'{"in_flight": 2, "ready": true}') == {"in_flight": 2, "ready": True}
    for raw in (b"", b"[]", b"not json", b'{"in_flight": null}', b'{"in_flight": -1}', b'{"ready": 1}'):
        assert _load_report(raw) is None, raw
    assert _load_report(b"[" * 100_000 + b"]" * 100_000) is None


async def test_a_ping_flood_from_a_client_that_does_not_read_is_bounded_and_harmless():
    """50,000 PINGs unread: the worker drops PONGs past its bound, serves others, and the flooder too."""
    probe = Probe()
    flood = b"".join(
        codec.HEADER.pack(8, codec.FrameType.PING, 0) + i.to_bytes(8, "big") for i in range(50_000)
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(probe) as (_, address), raw_connection(address) as (stream, conn):
            await stream.send_all(flood)
            async with TcpClient.connect(*address) as other:
                assert (await other.call("context"))["peer"]
            await stream.send_all(conn.send(codec.Request(1, "context", "", 0, (), b"")))
            events = await _read_until(stream, conn, codec.End, keep=True)
    pongs = [e for e in events if isinstance(e, codec.Pong)]
    assert 0 < len(pongs) < 50_000 and isinstance(events[-1], codec.End)


async def test_a_client_that_answers_pings_is_never_closed():
    """Silent but alive: a v4 client that answers each PING keeps its connection across sweeps."""
    probe = Probe()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(probe, heartbeat_interval=0.2) as (_, address),
            raw_connection(address) as (
                stream,
                conn,
            ),
        ):
            for _ in range(2):
                ping = await _read_until(stream, conn, codec.Ping)
                await stream.send_all(conn.send(codec.Pong(ping.opaque)))
            await stream.send_all(conn.send(codec.Request(1, "context", "", 0, (), b"")))
            end = await _read_until(stream, conn, codec.End)
    assert end == codec.End(1)


async def test_a_version_3_worker_is_used_without_ping():
    """New client, old worker: the client works at version 3 and says plainly that PING needs 4."""
    seen: list[codec.FrameType] = []

    async def old_worker(stream: trio.SocketStream) -> None:
        conn = codec.Connection(codec.Role.SERVER, version=3)
        while True:
            event = conn.next_event()
            if event is codec.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            seen.append(type(event).__name__)
            if isinstance(event, codec.Hello):
                await stream.send_all(conn.send(conn.local_hello))
            elif isinstance(event, codec.Request):
                await stream.send_all(conn.send_data(event.stream_id, b'"hi"') + conn.send(codec.End(1)))
            elif isinstance(event, codec.ConnectionClosed):
                return

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, old_worker, 0, host="127.0.0.1"))
            address = listeners[0].socket.getsockname()[:2]
            async with TcpClient.connect(*address, heartbeat_interval=0.001) as client:
                answer = await client.call("echo", {})
                with pytest.raises(BadRequest, match="version 3, which has no PING"):
                    await client.ping()
            nursery.cancel_scope.cancel()
    assert answer == "hi" and client._codec.version == 3 and "Ping" not in seen


async def _read_until(
    stream: trio.SocketStream, conn: codec.Connection, kind: type, *, keep: bool = False
) -> object:
    """Read events until one of ``kind`` and return it (for ConnectionClosed, or with ``keep``, every
    event so far)."""
    events = []
    while True:
        event = conn.next_event()
        if event is codec.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        events.append(event)
        if isinstance(event, kind):
            return events if keep or kind is codec.ConnectionClosed else event
