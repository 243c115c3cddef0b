"""The HTTP transport against peers that misbehave: clients that stop reading, bursts of connections,
rapid resets, keep-alive requests racing a drain, h2 connections told GOAWAY by a drain (and, for
comparison, a non-reading TCP-protocol client at SIGTERM). Real sockets on 127.0.0.1, real workers."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from hyperframe.frame import Frame, GoAwayFrame

from runtime import RequestContext, Worker, open_worker
from runtime.testing import sample, worker_process
from transports.http import HttpTransport

# The worker must be gone this long after drain_timeout + kill_grace, whatever its peers do.
EXIT_SLACK = 5.0
DRAIN_TIMEOUT = 1.0
KILL_GRACE = 1.0  # WorkerConfig's default, which `ingress serve` uses
# A stream the mocker would take minutes to finish: it is still running when the drain ends.
ENDLESS = json.dumps({"max_tokens": 10_000_000, "itl_ms": 0}).encode()
# h2's largest flow-control window: the client lets the server send until TCP itself blocks.
MAX_WINDOW = 2**31 - 1


def _small_receive_buffer(sock: trio.socket.SocketType) -> None:
    """So that a client that does not read stalls the server's sends after a few KiB."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


async def _connect(address: tuple[str, int]) -> trio.SocketStream:
    sock = trio.socket.socket()
    _small_receive_buffer(sock)
    await sock.connect(address)
    return trio.SocketStream(sock)


class H2Peer:
    """The client side of h2 (the h2 state machine) on a raw socket, reading only when told to.

    GOAWAY frames are not given to h2 (its state machine goes CLOSED on one, python-hyper/h2#1181, and
    would then reject the frames of the streams the server still finishes): they go in ``events``
    as they are, in the order they came."""

    def __init__(self, stream: trio.SocketStream, window: int | None = None) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            if window > 65535:  # the connection's window only grows (RFC 9113 6.9.2)
                self.conn.increment_flow_control_window(window - 65535)
        self.events: list[h2.events.Event | GoAwayFrame] = []
        self._unparsed = bytearray()

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    def post(self, path: str, body: bytes) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "t")]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        return stream_id

    async def ping_pong(self) -> None:
        """Send a PING and read until its acknowledgement: the server has handled every earlier frame."""
        self.conn.ping(b"barrier!")
        await self.flush()
        await self.read_until(h2.events.PingAckReceived, None)

    async def read_until(self, kind: type, stream_id: int | None) -> None:
        """Read (without acknowledging data) until an event of ``kind`` arrives on ``stream_id``."""
        while not any(isinstance(e, kind) and _on(e, stream_id) for e in self.events):
            assert await self._receive(), "the server closed the connection"

    async def read_until_goaway(self) -> GoAwayFrame:
        while not self.goaways():
            assert await self._receive(), "the server closed the connection"
        return self.goaways()[0]

    async def read_until_closed(self) -> None:
        while await self._receive():
            pass

    async def _receive(self) -> bool:
        """Read once and hand h2 every complete frame but GOAWAY; False at the server's close."""
        data = await _receive_or_eof(self.stream)
        self._unparsed += data
        while len(self._unparsed) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._unparsed[:9]))
            if len(self._unparsed) < 9 + length:
                break
            raw, self._unparsed = bytes(self._unparsed[: 9 + length]), self._unparsed[9 + length :]
            if isinstance(frame, GoAwayFrame):
                frame.parse_body(memoryview(raw[9:]))
                self.events.append(frame)
            else:
                self.events += self.conn.receive_data(raw)
        return bool(data)

    def goaways(self) -> list[GoAwayFrame]:
        return [e for e in self.events if isinstance(e, GoAwayFrame)]

    def of(self, kind: type, stream_id: int) -> list[Any]:
        """The events of ``kind`` received on ``stream_id``."""
        return [e for e in self.events if isinstance(e, kind) and _on(e, stream_id)]

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, stream_id))

    def status(self, stream_id: int) -> bytes:
        [response] = self.of(h2.events.ResponseReceived, stream_id)
        return dict(response.headers)[b":status"]


def _on(event: h2.events.Event, stream_id: int | None) -> bool:
    return getattr(event, "stream_id", None) == stream_id


# A PING frame (RFC 9113 6.7): length 8, type 6, no flags, stream 0, 8 bytes of payload.
_PING = struct.pack(">I", 8)[1:] + b"\x06\x00" + b"\x00\x00\x00\x00" + b"pingping"


async def _stall_http1(address: tuple[str, int]) -> trio.SocketStream:
    """An HTTP/1.1 client that asks for an endless stream, reads its head, then stops reading."""
    stream = await _connect(address)
    head = b"POST /v1/generate HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(ENDLESS)
    await stream.send_all(head + ENDLESS)
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some(1)
    return stream


async def _stall_h2(address: tuple[str, int]) -> trio.SocketStream:
    """An h2 client with huge windows that asks for an endless stream, then stops reading."""
    stream = await _connect(address)
    peer = H2Peer(stream, window=MAX_WINDOW)
    stream_id = peer.post("/v1/generate", ENDLESS)
    await peer.flush()
    await peer.read_until(h2.events.ResponseReceived, stream_id)
    return stream


async def _stall_tcp(address: tuple[str, int]) -> trio.SocketStream:
    """A TCP-protocol client that asks for an endless stream, reads its first chunk, then stops reading."""
    from transports.tcp import _protocol as codec

    stream = await _connect(address)
    conn = codec.Connection(codec.Role.CLIENT)
    await stream.send_all(conn.send(conn.local_hello))
    while conn.peer_hello is None:
        conn.receive_data(await stream.receive_some(65536))
        conn.next_event()
    await stream.send_all(conn.send(codec.Request(1, "generate", "stall", 0, (), ENDLESS)))
    while not isinstance(conn.next_event(), codec.Data):
        conn.receive_data(await stream.receive_some(65536))
    return stream


async def _flood_pings(stream: trio.SocketStream) -> None:
    """Send PINGs and never read the acknowledgements, until the server stops reading too."""
    peer = H2Peer(stream)
    batch = _PING * 4096
    async with stream:
        await peer.flush()
        with contextlib.suppress(trio.BrokenResourceError):  # the worker is gone: the test is over
            while True:
                await stream.send_all(batch)


@pytest.mark.parametrize("peer", ["http1-stream", "h2-stream", "h2-ping-flood", "tcp-stream"])
async def test_sigterm_exits_in_bounded_time_whatever_a_non_reading_peer_does(peer):
    """A client that stops reading cannot keep the worker alive past drain_timeout + kill_grace."""
    args = ("--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--drain-timeout", str(DRAIN_TIMEOUT))
    async with worker_process(*args, "--no-access-log") as worker, trio.open_nursery() as nursery:
        address = worker.addresses["http"]
        if peer == "tcp-stream":
            nursery.start_soon(_hold_open, await _stall_tcp(worker.addresses["tcp"]))
        elif peer == "h2-ping-flood":
            nursery.start_soon(_flood_pings, await _connect(address))
            # Our sender is blocked: the worker has stopped reading because its own sends are stuck.
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        else:
            stalled = await (_stall_http1 if peer == "http1-stream" else _stall_h2)(address)
            nursery.start_soon(_hold_open, stalled)  # open and unread until the test ends
        worker.send_signal(signal.SIGTERM)
        with trio.fail_after(DRAIN_TIMEOUT + KILL_GRACE + EXIT_SLACK):
            code = await worker.wait_exit()
        nursery.cancel_scope.cancel()
    # A stream still running when the drain ends is killed: a forced drain (3); pings alone drain (0).
    assert code == (0 if peer == "h2-ping-flood" else 3)


async def _hold_open(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


class Produced:
    """What a handler yielded, and an event for the test's storm bookkeeping."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}


CHUNK = "x" * 1000
# On main the handler had no bound at all; this cap only keeps a failing run from eating the machine.
PRODUCE_CAP = 20_000


def _flooding_worker(produced: Produced) -> Worker:
    worker = Worker("flood")

    @worker.endpoint("flood")
    async def flood(request: Any, ctx: RequestContext) -> Any:
        for _ in range(PRODUCE_CAP):
            produced.bytes[ctx.id] = produced.bytes.get(ctx.id, 0) + len(CHUNK)
            yield CHUNK

    return worker


@pytest.mark.parametrize("connection_high_water", [None, 64 * 1024])
async def test_h2_flow_control_stops_the_handler_per_stream_and_per_connection(connection_high_water):
    """Ten h2 streams whose client reads nothing: each handler stops once its bounded buffers are full."""
    produced = Produced()
    high_water = 16 * 1024
    options: dict[str, Any] = {"stream_high_water": high_water}
    if connection_high_water is not None:
        options["connection_high_water"] = connection_high_water
    else:
        connection_high_water = 1024 * 1024  # the default
    transport = HttpTransport(port=0, **options)
    async with open_worker(_flooding_worker(produced), [transport]) as handle:
        async with await trio.open_tcp_stream(*handle.addresses["http"]) as stream:
            peer = H2Peer(stream)  # h2's default windows (64 KiB), never opened further
            for _ in range(10):
                peer.post("/v1/flood", b"{}")
            await peer.flush()
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # every handler is held back
            running = handle.binding("http", "flood").statistics().in_flight
            total = sum(produced.bytes.values())
        handle.shutdown("test")
    print(f"h2 produced per stream: {sorted(produced.bytes.values())}, total {total}")
    assert running == 10 and len(produced.bytes) == 10
    # Per stream: its writer's buffer, the bytes in the writer's hand, the h2 stream buffer (each
    # about high_water), and its share of the connection window the peer opened (64 KiB in all).
    per_stream = 3 * (high_water + len(CHUNK) + 64)
    assert max(produced.bytes.values()) <= per_stream + 65535
    # The connection: the peer's window, plus what can wait before the h2 buffers, plus those buffers.
    assert total <= 65535 + 10 * 2 * (high_water + len(CHUNK) + 64) + connection_high_water + high_water
    assert total < PRODUCE_CAP * len(CHUNK)  # far from the unbounded case (20 MB per stream)


class Reply:
    """One HTTP/1.1 reply read off a raw socket: complete, cut (fewer body bytes than announced), or
    empty (the connection ended before a status line)."""

    def __init__(self, status: int | None, headers: dict[bytes, bytes], body: bytes, complete: bool):
        self.status, self.headers, self.body, self.complete = status, headers, body, complete


async def _read_reply(stream: trio.SocketStream, buffer: bytearray) -> Reply:
    while b"\r\n\r\n" not in buffer:
        data = await _receive_or_eof(stream)
        if not data:
            return Reply(None, {}, bytes(buffer), False)
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    body = bytearray(rest)
    while len(body) < length:
        data = await _receive_or_eof(stream)
        if not data:
            return Reply(int(status_line.split()[1]), headers, bytes(body), False)
        body += data
    buffer[:] = body[length:]
    return Reply(int(status_line.split()[1]), headers, bytes(body[:length]), True)


async def _receive_or_eof(stream: trio.SocketStream) -> bytes:
    try:
        return bytes(await stream.receive_some(65536))
    except trio.BrokenResourceError:  # reset: as empty as a clean EOF for the caller
        return b""


ECHO = b"POST /v1/echo HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"


def _holding_worker(release: trio.Event, holding: trio.Event) -> Worker:
    worker = Worker("keep-alive")

    @worker.endpoint("echo")
    async def echo(request: Any, ctx: RequestContext) -> Any:
        return request

    @worker.endpoint("hold")
    async def hold(request: Any, ctx: RequestContext) -> Any:
        holding.set()  # in flight: the drain waits for it, so the test controls when phase 3 comes
        await release.wait()
        return "released"

    return worker


def _assert_refused_for_draining(reply: Reply) -> None:
    assert reply.complete and reply.status == 503, (reply.status, reply.body)
    assert reply.headers[b"retry-after"] == b"1" and reply.headers[b"connection"] == b"close"
    error = json.loads(reply.body)["error"]
    # UNAVAILABLE at the door; SHUTTING_DOWN if it passed the door as admission closed: neither ran.
    assert error["code"] in ("UNAVAILABLE", "SHUTTING_DOWN") and error["retryable"] is True


async def test_a_request_on_an_idle_keep_alive_connection_during_the_drain_gets_a_complete_503():
    """Draining does not close idle keep-alive connections under a request: it answers 503 + close."""
    release, holding = trio.Event(), trio.Event()
    async with open_worker(_holding_worker(release, holding), [HttpTransport(port=0)]) as handle:
        address = handle.addresses["http"]
        async with await trio.open_tcp_stream(*address) as idle, trio.open_nursery() as nursery:
            buffer = bytearray()
            await idle.send_all(ECHO)
            assert (await _read_reply(idle, buffer)).status == 200  # now idle, having served a request
            nursery.start_soon(_post_hold, address)
            await holding.wait()
            handle.shutdown("test")
            await handle.wait_intake_closed()
            await idle.send_all(ECHO)  # on the wire as the drain runs
            reply = await _read_reply(idle, buffer)
            end = await _receive_or_eof(idle)
            release.set()
        _assert_refused_for_draining(reply)
        assert end == b"" and not buffer  # then a clean close, nothing after the 503


async def _post_hold(address: tuple[str, int]) -> None:
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(b"POST /v1/hold HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}")
        assert (await _read_reply(stream, bytearray())).status == 200


class _Gates:
    """What the GOAWAY tests hold: a stream after its first chunk, and a unary call that keeps phase 3
    (which closes every connection) away until the test is done, so only the drain can close one."""

    def __init__(self) -> None:
        self.streaming, self.stream_release = trio.Event(), trio.Event()
        self.holding, self.phase3 = trio.Event(), trio.Event()


def _streaming_worker(gates: _Gates) -> Worker:
    worker = _holding_worker(gates.phase3, gates.holding)

    @worker.endpoint("count")
    async def count(request: Any, ctx: RequestContext) -> Any:
        for i in range(3):
            yield {"i": i}
            if i == 0:
                gates.streaming.set()
                await gates.stream_release.wait()

    return worker


COUNTED = b'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\nevent: end\ndata: {"chunks":3}\n\n'


async def _drain_held(handle: Any, gates: _Gates, nursery: trio.Nursery) -> None:
    """Start the drain with a call in flight that holds phase 3 off (until ``gates.phase3``)."""
    nursery.start_soon(_post_hold, handle.addresses["http"])
    await gates.holding.wait()
    handle.shutdown("test")
    await handle.wait_intake_closed()


@asynccontextmanager
async def _busy_h2_connection_in_drain(early_goaway: bool) -> AsyncIterator[tuple[Any, _Gates, H2Peer, int]]:
    """An h2 connection whose stream is held after its first chunk when the drain starts (with an early
    GOAWAY: once it has come); phase 3 is held off until the block ends."""
    gates = _Gates()
    transport = HttpTransport(port=0, early_goaway=early_goaway)
    async with open_worker(_streaming_worker(gates), [transport]) as handle, trio.open_nursery() as nursery:
        async with await trio.open_tcp_stream(*handle.addresses["http"]) as stream:
            peer = H2Peer(stream)
            running = peer.post("/v1/count", b"{}")
            await peer.flush()
            await gates.streaming.wait()
            await _drain_held(handle, gates, nursery)
            if early_goaway:
                await peer.read_until_goaway()  # while the stream is held: sent at drain start
            yield handle, gates, peer, running
        gates.phase3.set()


def _assert_graceful(goaway: GoAwayFrame, last_stream_id: int) -> None:
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == last_stream_id


def _assert_whole(peer: H2Peer, stream_id: int) -> None:
    assert peer.body(stream_id) == COUNTED and peer.of(h2.events.StreamEnded, stream_id)


@pytest.mark.parametrize("early_goaway", [False, True], ids=["after-its-end", "early"])
async def test_h2_stream_running_at_drain_start_ends_whole_then_goaway_and_close(early_goaway):
    """A running stream gets all its chunks; GOAWAY comes after its end (early_goaway: before); then close."""
    async with _busy_h2_connection_in_drain(early_goaway) as (_, gates, peer, running):
        gates.stream_release.set()
        await peer.read_until_closed()
    [goaway] = peer.goaways()
    _assert_graceful(goaway, last_stream_id=running)
    _assert_whole(peer, running)
    [end] = peer.of(h2.events.StreamEnded, running)
    assert (peer.events.index(goaway) < peer.events.index(end)) is early_goaway


@pytest.mark.parametrize("early_goaway", [False, True], ids=["after-its-end", "early"])
async def test_new_h2_stream_on_a_draining_connection_is_refused_and_nothing_is_lost(early_goaway):
    """A new stream on a busy connection in the drain: 503, or REFUSED_STREAM past an early GOAWAY."""
    async with _busy_h2_connection_in_drain(early_goaway) as (handle, gates, peer, running):
        late = peer.post("/v1/echo", b"{}")
        await peer.flush()
        await peer.read_until(h2.events.StreamReset if early_goaway else h2.events.StreamEnded, late)
        gates.stream_release.set()
        await peer.read_until_closed()
    assert handle.binding("http", "echo").statistics().started == 0
    _assert_whole(peer, running)
    [goaway] = peer.goaways()
    if early_goaway:
        _assert_graceful(goaway, last_stream_id=running)
        [reset] = peer.of(h2.events.StreamReset, late)
        assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    else:
        _assert_graceful(goaway, last_stream_id=late)  # every stream it opened was answered
        [response] = peer.of(h2.events.ResponseReceived, late)
        assert peer.status(late) == b"503" and dict(response.headers)[b"retry-after"] == b"1"
        assert json.loads(peer.body(late))["error"]["retryable"] is True


async def test_an_idle_h2_connection_gets_goaway_and_is_closed_at_drain_start():
    """An idle h2 connection gets GOAWAY (its last stream's id) and is closed while the drain still runs."""
    gates = _Gates()
    async with (
        open_worker(_streaming_worker(gates), [HttpTransport(port=0)]) as handle,
        trio.open_nursery() as nursery,
        await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
    ):
        peer = H2Peer(stream)
        served = peer.post("/v1/echo", b"{}")
        await peer.flush()
        await peer.read_until(h2.events.StreamEnded, served)
        await _drain_held(handle, gates, nursery)
        await peer.read_until_closed()
        in_flight = handle.statistics().in_flight  # the held call: phase 3 has not come
        gates.phase3.set()
    assert in_flight == 1
    [goaway] = peer.goaways()
    _assert_graceful(goaway, last_stream_id=served)


async def test_an_h2_connection_opened_during_the_drain_gets_its_503_then_goaway():
    """An h2 connection opened in the drain is answered 503 (not refused: no reconnect loop), then GOAWAY."""
    gates = _Gates()
    async with (
        open_worker(_streaming_worker(gates), [HttpTransport(port=0)]) as handle,
        trio.open_nursery() as nursery,
    ):
        await _drain_held(handle, gates, nursery)
        async with await trio.open_tcp_stream(*handle.addresses["http"]) as stream:
            peer = H2Peer(stream)
            late = peer.post("/v1/echo", b"{}")
            await peer.flush()
            await peer.read_until_closed()
        gates.phase3.set()
    [goaway] = peer.goaways()
    _assert_graceful(goaway, last_stream_id=late)
    assert peer.status(late) == b"503" and peer.of(h2.events.StreamEnded, late)


KEEP_ALIVE_CLIENTS = 60


async def test_keep_alive_clients_through_a_drain_get_no_empty_or_cut_reply():
    """60 keep-alive clients looping requests across the start of a drain: every reply is complete."""
    release, holding = trio.Event(), trio.Event()
    tally: dict[str, int] = {"200": 0, "503": 0, "empty": 0, "cut": 0}
    all_served, all_refused = trio.Event(), trio.Event()
    served_once: set[int] = set()

    async def client(index: int, address: tuple[str, int]) -> None:
        async with await trio.open_tcp_stream(*address) as stream:
            buffer = bytearray()
            while True:
                await stream.send_all(ECHO)
                reply = await _read_reply(stream, buffer)
                if not reply.complete:
                    tally["empty" if reply.status is None else "cut"] += 1
                    return
                tally[str(reply.status)] += 1
                served_once.add(index)
                if len(served_once) == KEEP_ALIVE_CLIENTS:
                    all_served.set()
                if reply.status == 503:
                    _assert_refused_for_draining(reply)
                    if tally["503"] == KEEP_ALIVE_CLIENTS:
                        all_refused.set()
                    return  # told to close: a real client goes elsewhere

    async with open_worker(_holding_worker(release, holding), [HttpTransport(port=0)]) as handle:
        address = handle.addresses["http"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_post_hold, address)
            await holding.wait()
            for index in range(KEEP_ALIVE_CLIENTS):
                nursery.start_soon(client, index, address)
            await all_served.wait()
            handle.shutdown("test")  # while requests are on the wire on every connection
            await all_refused.wait()
            release.set()
    assert tally["empty"] == tally["cut"] == 0, tally
    assert tally["503"] == KEEP_ALIVE_CLIENTS and tally["200"] >= KEEP_ALIVE_CLIENTS
    print(f"keep-alive drain: {tally}")


STORM_CONNECTIONS = 1024
# struct tcp_info (linux/tcp.h): eight one-byte fields, then u32s; tcpi_total_retrans is the 24th u32.
_TOTAL_RETRANS = struct.Struct("=8x92xI")


def _retransmits(sock: trio.socket.SocketType) -> int:
    """Segments this socket had to send again (a SYN or request dropped by a full listen queue)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TOTAL_RETRANS.size)
    return int(_TOTAL_RETRANS.unpack(info)[0])


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except OSError:
        return 0


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is a Linux option")
@pytest.mark.skipif(_somaxconn() < STORM_CONNECTIONS, reason="the kernel caps every backlog below the storm")
async def test_a_storm_of_new_connections_is_answered_without_a_dropped_handshake():
    """1,024 connections opened at once are all answered, none of them needing a retransmission."""
    async with worker_process("--http", "127.0.0.1:0", "--no-access-log") as worker:
        address = worker.addresses["http"]
        statuses: list[bytes] = []
        retransmitted = 0

        async def one() -> None:
            nonlocal retransmitted
            async with await trio.open_tcp_stream(*address) as stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                reply = await _read_reply(stream, bytearray())
                statuses.append(b"%d" % (reply.status or 0))
                retransmitted += _retransmits(stream.socket)

        async with trio.open_nursery() as nursery:
            for _ in range(STORM_CONNECTIONS):
                nursery.start_soon(one)
    assert statuses == [b"200"] * STORM_CONNECTIONS
    assert retransmitted == 0  # with hypercorn's backlog of 100, hundreds waited for a retransmission


def _short_worker() -> Worker:
    worker = Worker("resets")

    @worker.endpoint("echo")
    async def echo(request: Any, ctx: RequestContext) -> Any:
        return request

    @worker.endpoint("tokens")
    async def tokens(request: Any, ctx: RequestContext) -> Any:
        for i in range(request.get("n", 2)):
            yield {"i": i}

    return worker


RESET_ROUNDS = 30
STREAMS_PER_ROUND = 20


def _assert_accounts_balance(handle: Any, endpoints: tuple[str, ...]) -> int:
    """Each accepted request ended in exactly one outcome; nothing is left in flight; disconnects are
    counted only for requests whose outcome is ``disconnected``. Returns the requests accepted."""
    accepted = 0
    for name in endpoints:
        labels = {"endpoint": name, "transport": "http"}
        statistics = handle.binding("http", name).statistics()
        outcomes = sum(
            sample(handle.runtime, "ingress_requests_total", **labels, outcome=outcome)
            for outcome in ("ok", "error", "cancelled", "disconnected", "rejected", "shutdown")
        )
        assert sample(handle.runtime, "ingress_inflight_requests", **labels) == 0, name
        assert statistics.in_flight == 0 and outcomes == statistics.started == statistics.finished, name
        disconnects = sum(
            sample(handle.runtime, "ingress_client_disconnects_total", **labels, reason=reason)
            for reason in ("closed", "reset", "gone")
        )
        disconnected = sample(handle.runtime, "ingress_requests_total", **labels, outcome="disconnected")
        assert disconnects == disconnected, name
        accepted += statistics.started
    return accepted


async def test_h2_rapid_reset_storm_leaves_every_count_balanced():
    """Streams opened and reset at once, round after round: every count returns to 0, one outcome each."""
    async with open_worker(_short_worker(), [HttpTransport(port=0)]) as handle:
        address = handle.addresses["http"]
        for _ in range(RESET_ROUNDS):
            async with await trio.open_tcp_stream(*address) as stream:
                peer = H2Peer(stream)
                for index in range(STREAMS_PER_ROUND):
                    path = "/v1/echo" if index % 2 else "/v1/tokens"
                    stream_id = peer.post(path, b'{"n": 2}')
                    peer.conn.reset_stream(stream_id)
                    await peer.flush()
                await peer.ping_pong()  # the worker has read every frame of this round
        # Nothing left to run in the worker (its requests ended, or were refused): the books must balance.
        with trio.fail_after(10):
            for name in ("echo", "tokens"):
                await handle.binding("http", name).tracker.wait_idle()
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        accepted = _assert_accounts_balance(handle, ("echo", "tokens"))
        handle.shutdown("test")
        assert not (await handle.wait_drained()).forced
    assert accepted > 0


def _stalling_worker(deadline_hit: trio.Event) -> Worker:
    worker = Worker("stall")

    @worker.endpoint("flood")
    async def flood(request: Any, ctx: RequestContext) -> Any:
        try:
            while True:
                yield CHUNK * 64
        finally:
            deadline_hit.set()  # the caller's deadline ended the stream (nothing else does here)

    return worker


async def test_a_caller_that_closes_after_its_deadline_is_an_error_not_a_disconnect():
    """A stream ended by its deadline whose caller then leaves is counted once: error, no disconnect."""
    deadline_hit = trio.Event()
    async with open_worker(_stalling_worker(deadline_hit), [HttpTransport(port=0)]) as handle:
        stream = await _connect(handle.addresses["http"])
        head = b"POST /v1/flood HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nx-request-timeout-ms: 200\r\n\r\n"
        async with stream:
            await stream.send_all(head + b"{}")  # ... and never reads: the error event cannot leave
            await deadline_hit.wait()
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with trio.fail_after(10):
            await handle.binding("http", "flood").tracker.wait_idle()
        _assert_accounts_balance(handle, ("flood",))
        labels = {"endpoint": "flood", "transport": "http"}
        assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="error") == 1


async def test_h2_connection_closed_while_responses_wait_for_window_ends_every_request():
    """Short h2 streams finished but held by a closed window, then the connection closes: none leaks."""
    async with open_worker(_short_worker(), [HttpTransport(port=0)]) as handle:
        for _ in range(3):
            async with await trio.open_tcp_stream(*handle.addresses["http"]) as stream:
                peer = H2Peer(stream, window=0)  # the server may send headers, never data
                ids = [peer.post("/v1/tokens", b'{"n": 2}') for _ in range(5)]
                await peer.flush()
                for stream_id in ids:
                    await peer.read_until(h2.events.ResponseReceived, stream_id)
                await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # every response is stuck
        with trio.fail_after(10):
            await handle.binding("http", "tokens").tracker.wait_idle()
        _assert_accounts_balance(handle, ("tokens",))


async def test_http_backlog_flag_sets_the_listen_queue():
    """`ingress serve --http-backlog N` reaches the listener, which logs the queue it got."""
    async with worker_process("--http", "127.0.0.1:0", "--http-backlog", "128") as worker:
        listening = await worker.wait_event("http.listening")
    assert listening["backlog"] == 128


class _SlowBatchProtocol:
    """Records the events the connection hands over; handling data takes a while, like an h2 batch."""

    def __init__(self, inside: trio.Event, release: trio.Event) -> None:
        from hypercorn.protocol.h2 import H2Protocol

        self.events: list[str] = []
        self.inside = inside
        self.release = release
        # What the connection checks to know it speaks h2 (only h2's batches hold a Closed back).
        self.protocol = H2Protocol.__new__(H2Protocol)

    async def handle(self, event: Any) -> None:
        self.events.append(f"{type(event).__name__} started")
        if type(event).__name__ == "RawData":
            self.inside.set()
            await self.release.wait()  # meanwhile a send breaks in another task
        self.events.append(f"{type(event).__name__} done")


async def test_a_close_seen_while_a_batch_is_handled_waits_for_the_batch():
    """On h2, Closed never reaches the protocol in the middle of another event (the rapid-reset leak)."""
    from hypercorn.config import Config
    from hypercorn.events import RawData

    from runtime._http_server import Connection, HttpServerLimits

    inside, release = trio.Event(), trio.Event()
    protocol = _SlowBatchProtocol(inside, release)
    left, right = trio.socket.socketpair()
    with left, right:
        connection = Connection(None, Config(), HttpServerLimits(), trio.SocketStream(left))  # type: ignore[arg-type]
        connection.protocol = protocol  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._handle, RawData(b"frames"))
            await inside.wait()
            nursery.start_soon(connection._tell_closed)  # what a broken send does
            await trio.testing.wait_all_tasks_blocked()
            assert protocol.events == ["RawData started"]
            release.set()
    assert protocol.events == ["RawData started", "RawData done", "Closed started", "Closed done"]


async def test_h2_body_data_after_an_early_answer_leaves_the_connection_and_its_streams_alone():
    """A 413 sent before the body ended, then more of that body: the connection's other stream completes."""
    transport = HttpTransport(port=0, max_body_size=1024)
    async with (
        open_worker(_short_worker(), [transport]) as handle,
        await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
    ):
        peer = H2Peer(stream, window=MAX_WINDOW)
        early = peer.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", "/v1/echo"), (":scheme", "http"), (":authority", "t")]
        peer.conn.send_headers(early, headers)
        peer.conn.send_data(early, b"x" * 2000)  # over the limit, and more to come
        await peer.flush()
        with trio.fail_after(10):
            await peer.read_until(h2.events.StreamEnded, early)  # answered 413 mid-body
            peer.conn.send_data(early, b"x" * 2000, end_stream=True)
            sibling = peer.post("/v1/tokens", b'{"n": 3}')
            await peer.flush()
            await peer.read_until(h2.events.StreamEnded, sibling)
    statuses = {
        e.stream_id: dict(e.headers)[b":status"]
        for e in peer.events
        if isinstance(e, h2.events.ResponseReceived)
    }
    assert statuses == {early: b"413", sibling: b"200"}


def test_the_installed_hypercorn_is_one_the_connection_loop_was_tested_against():
    """The loop drives hypercorn's private protocol layer: another hypercorn release must fail loudly."""
    from importlib.metadata import version

    from runtime._http_server import TESTED_HYPERCORN

    installed = version("hypercorn")
    assert installed.startswith(tuple(f"{v}." for v in TESTED_HYPERCORN)), (
        f"hypercorn {installed} is not one of {TESTED_HYPERCORN}: re-run tests/test_http*.py and "
        "scripts/hostile.py against it, then widen TESTED_HYPERCORN and pyproject's bound together"
    )


async def test_an_h2_exchange_whose_handler_is_behind_still_reads_the_clients_window_updates():
    """A handler that answers 4 KiB per message fills the client's 64 KiB window while the body runs a
    whole inbox ahead: the worker must still read the client's WINDOW_UPDATEs (it once stopped reading the
    connection while a body waited for the app, and the exchange deadlocked)."""
    worker = Worker("h2-exchange")

    @worker.endpoint("big_answers", duplex=True, max_input_bytes=1024)
    async def big_answers(messages: Any, ctx: RequestContext) -> Any:
        async for message in messages:
            yield {"n": message["n"], "pad": "x" * 4096}

    # 1,000 body lines of ~400 bytes: more than the inbox, hypercorn's app queue (10 DATA frames of up
    # to 16 KiB) and the worker's 64 KiB window together hold, so the body must wait for the app.
    count = 1000
    body = b"".join(json.dumps({"n": n, "pad": "y" * 380}).encode() + b"\n" for n in range(count))
    async with (
        open_worker(worker, [HttpTransport(port=0)]) as handle,
        await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
    ):
        peer = H2Peer(stream)  # h2's default 64 KiB windows
        stream_id = peer.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":path", "/v1/big_answers"),
            (":scheme", "http"),
            (":authority", "t"),
        ]
        peer.conn.send_headers(stream_id, [*headers, ("accept", "application/x-ndjson")])
        answers = b""
        with trio.fail_after(20):
            sent = 0
            while True:
                # Send what the worker's windows allow, then read (acknowledging every answer at once).
                window = min(
                    peer.conn.local_flow_control_window(stream_id),
                    peer.conn.max_outbound_frame_size,
                    len(body) - sent,
                )
                if window:
                    peer.conn.send_data(
                        stream_id, body[sent : sent + window], end_stream=sent + window == len(body)
                    )
                    sent += window
                await peer.flush()
                data = await stream.receive_some(65536)
                assert data, "the worker closed the connection"
                for event in peer.conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        answers += event.data
                        peer.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    if isinstance(event, h2.events.StreamEnded):
                        break
                else:
                    continue
                break
    assert [json.loads(line)["n"] for line in answers.splitlines()] == list(range(count))


def _behind_worker(release: trio.Event) -> Worker:
    worker = _short_worker()

    @worker.endpoint("behind", duplex=True, max_input_bytes=1024)
    async def behind(messages: Any, ctx: RequestContext) -> Any:
        async for message in messages:
            yield message
            await release.wait()  # behind: the body piles up in the app's queue and h2's windows
            return

    return worker


async def _fill_behind_exchange(peer: H2Peer) -> int:
    """Open ``behind`` and send it body lines, one DATA frame each, until the stream's window is shut:
    hypercorn's app queue (10 frames) fills behind the handler; the stream id."""
    stream_id = peer.conn.get_next_available_stream_id()
    headers = [(":method", "POST"), (":path", "/v1/behind"), (":scheme", "http"), (":authority", "t")]
    peer.conn.send_headers(stream_id, [*headers, ("accept", "application/x-ndjson")])
    line = json.dumps({"pad": "y" * 200}).encode() + b"\n"
    while peer.conn.local_flow_control_window(stream_id) >= len(line):
        peer.conn.send_data(stream_id, line)
    await peer.flush()
    await peer.ping_pong()
    return stream_id


async def test_an_h2_client_resetting_an_exchange_whose_handler_is_behind_leaves_the_connection_serving():
    """RST_STREAM on an exchange whose body waits behind a full app queue: telling its app must not stop
    the loop that reads the connection; a sibling request on it is answered."""
    release = trio.Event()
    async with (
        open_worker(_behind_worker(release), [HttpTransport(port=0)]) as handle,
        await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
    ):
        peer = H2Peer(stream)
        with trio.fail_after(10):
            behind = await _fill_behind_exchange(peer)
            peer.conn.reset_stream(behind)
            sibling = peer.post("/v1/tokens", b'{"n": 3}')
            await peer.flush()
            await peer.read_until(h2.events.StreamEnded, sibling)
        release.set()


async def test_an_h2_exchange_that_finishes_while_behind_on_its_body_ends_ok():
    """The handler returns with the body piled up unread: its answer ends, and the request leaves
    flight as ok (it once waited for ever to tell its own app that the stream had closed)."""
    release = trio.Event()
    async with (
        open_worker(_behind_worker(release), [HttpTransport(port=0)]) as handle,
        await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
    ):
        peer = H2Peer(stream)
        with trio.fail_after(10):
            behind = await _fill_behind_exchange(peer)
            release.set()
            await peer.read_until(h2.events.StreamEnded, behind)
            await handle.binding("http", "behind").tracker.wait_idle()
        ok = sample(
            handle.runtime, "ingress_requests_total", endpoint="behind", transport="http", outcome="ok"
        )
    assert ok == 1
