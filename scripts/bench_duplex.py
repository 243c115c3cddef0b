"""Benchmark: full-duplex exchanges (the mocker's ``chat``) against minimal baselines, in one run.

The caller of each exchange sends M messages ``{"max_tokens":1}`` while it reads the answers, so every
message is answered by one chunk: the figure is messages per second, in and (the same number) out,
from the first message of the round to the last exchange's end. This process is only the load
generator; the servers run as their own processes on 127.0.0.1:

- TCP: the mocker under ``ingress serve`` (protocol version 3: exchanges as DATA within credit, the
  answers within their own credit, on one connection) against scripts/bench_raw_duplex_server.py, a
  minimal raw Trio server answering length-prefixed JSON messages (many exchanges on one connection too),
  one write per answer as scripts/bench_raw_server.py does. The clients on both sides are equally thin:
  pre-built frames, up to ``BURST`` messages per write, answers counted, nothing decoded. Rows with the
  project's own ``TcpClient.exchange()`` say what a Python caller gets (that client decodes every
  answer).
- HTTP: the mocker under ``ingress serve --http`` against the bare ASGI app of
  scripts/bench_http_baselines.py (``/v1/chat``) under hypercorn's trio worker: a chunked HTTP/1.1 body
  of NDJSON lines written while the NDJSON answers are read (one connection per exchange), and h2c
  (every exchange a stream of one connection); thin clients, ``BURST`` lines per chunk or DATA frame.
- NATS: ``NatsClient.exchange()`` against the mocker through a local nats-server (no baseline: there is
  no plain nats-py duplex to compare with; the rows say what a Python caller gets).
- Memory: in this process, through the memory transport (runtime.testing), a caller that sends and
  never reads: how many messages get in before flow control holds ``send()`` back, and what they cost.

Each throughput figure is the median of three rounds, alternating the project and the baseline so that
noise on this shared machine hits both alike; the ratios are what to read.

    python scripts/bench_duplex.py            # full run (about two minutes)
    python scripts/bench_duplex.py --quick    # smaller sizes, one round: a smoke test

Goals (from the issue): TCP exchange messages/s >= 1.0x the raw baseline; a caller that never reads
costs the same memory however much it tries to send.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from runtime import WorkerConfig, configure_logging, open_worker
from runtime.mocker import create_mocker
from runtime.testing import MemoryTransport, nats_server, spawn_process, worker_process
from transports.tcp import TcpClient
from transports.tcp import _protocol as codec

HERE = pathlib.Path(__file__).parent
RAW_SERVER = [sys.executable, str(HERE / "bench_raw_duplex_server.py")]
BARE_HTTP = [sys.executable, str(HERE / "bench_http_baselines.py"), "hypercorn-trio"]
RUN_TIMEOUT = 600.0  # the whole benchmark stops by itself after this long
ROUND_TIMEOUT = 60.0  # a round takes seconds: one that stalls fails, naming its row, after this long
MESSAGE = b'{"max_tokens":1}'  # answered by exactly one chunk
LINE = MESSAGE + b"\n"  # the same message in an HTTP body (NDJSON)
# A caller that is ahead has several messages ready: the thin clients write up to this many at once.
# One write per message (what TcpClient.exchange() comes to) would make this load generator, not the
# servers, the bottleneck on 2 cores, and wakes a server once per message.
BURST = 16
ANSWER_MARK = b'"turn"'  # once in every answer, in either server's encoding
# The h2c client's receive window, as large as browsers announce (Chrome's is 15 MiB): with h2's default
# of 64 KiB the worker's answers can stall for good (docs/performance.md, "Exchanges").
H2_WINDOW = 16 * 1024 * 1024
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_RAW_HEADER = struct.Struct("!II")  # bench_raw_duplex_server.py: length, exchange id


@dataclass(frozen=True)
class Sizes:
    rounds: int
    tcp_messages: int  # per measurement, shared out among its exchanges
    http_messages: int
    nats_messages: int
    exchanges: tuple[int, ...]
    memory_attempts: tuple[int, ...]
    hold: float  # seconds a memory attempt waits once flow control holds its send() back


FULL = Sizes(3, 60_000, 20_000, 6_000, (1, 8, 32), (1_000, 10_000, 100_000, 1_000_000), 0.5)
QUICK = Sizes(1, 6_000, 1_200, 600, (1, 8), (1_000, 10_000, 100_000), 0.2)


# ---- TCP: thin clients, the same on both sides ------------------------------------------------------


class ThinDuplex:
    """One connection running exchanges at once: a task per exchange writes its messages, while one
    reader counts the answers until every exchange has ended. Subclasses speak a wire format."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.write_lock = trio.Lock()  # the exchanges' writers share the socket
        self.answers = 0
        self.open: set[int] = set()

    async def run(self, exchanges: int, messages: int) -> int:
        ids = range(1, exchanges + 1)
        self.open = set(ids)
        await self.start_exchanges(ids)
        async with trio.open_nursery() as nursery:
            for exchange in ids:
                nursery.start_soon(self.send_messages, exchange, messages)
            await self.read_until_all_ended()
        return self.answers

    async def write(self, data: bytes) -> None:
        async with self.write_lock:
            await self.stream.send_all(data)

    async def read_until_all_ended(self) -> None:
        buffer = bytearray()
        while self.open:
            buffer += await receive(self.stream)
            del buffer[: self.take_frames(buffer)]  # once per read: see take_frames
            if owed := self.owed():
                await self.write(owed)

    def owed(self) -> bytes:
        """What the reader must write back after a read (flow-control credit), if the wire has any."""
        return b""

    async def start_exchanges(self, ids: range) -> None:
        """Open the exchanges, if the wire format has a step for that."""

    async def send_messages(self, exchange: int, count: int) -> None:
        raise NotImplementedError

    def take_frames(self, buffer: bytearray) -> int:
        """Count the whole frames at the start of ``buffer``; the bytes they took. Parsed by offset:
        cutting each frame off the front would move the rest of the buffer every time."""
        raise NotImplementedError

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class IngressDuplex(ThinDuplex):
    """A thin client of the TCP protocol's version 3 (docs/protocol-tcp.md, "Exchanges"): REQUEST with
    an empty body, then each message as DATA within the worker's credit (WINDOW_UPDATE), then END; the
    answers' credit goes back, as TcpClient returns it, once half the window was taken."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.credit: dict[int, int] = {}
        self.credit_granted: dict[int, trio.Event] = {}
        self.taken: dict[int, int] = {}  # answer bytes read since credit was last returned

    @classmethod
    async def open(cls, address: tuple[str, int]) -> IngressDuplex:
        conn = cls(await trio.open_tcp_stream(*address))
        limits = (codec.DEFAULT_MAX_FRAME_SIZE, codec.DEFAULT_MAX_STREAMS)
        hello = struct.pack("!HII", codec.PROTOCOL_VERSION, *limits)
        await conn.stream.send_all(codec.MAGIC + _frame(codec.FrameType.HELLO, 0, hello))
        preface = len(codec.MAGIC) + codec.HEADER.size + len(hello)
        received = b""
        while len(received) < preface:  # the worker's magic and HELLO; nothing else comes before it
            received += await receive(conn.stream, preface - len(received))
        return conn

    async def start_exchanges(self, ids: range) -> None:
        # Here, in order, not by each exchange's task: stream ids must increase on the wire.
        for stream_id in ids:
            self.credit[stream_id] = 0
            await self.write(_frame(codec.FrameType.REQUEST, stream_id, _request_head("chat")))

    async def send_messages(self, stream_id: int, count: int) -> None:
        data = _frame(codec.FrameType.DATA, stream_id, MESSAGE)
        while count:
            while self.credit[stream_id] < len(MESSAGE):
                self.credit_granted[stream_id] = trio.Event()
                await self.credit_granted[stream_id].wait()
            burst = min(count, BURST, self.credit[stream_id] // len(MESSAGE))
            self.credit[stream_id] -= burst * len(MESSAGE)
            count -= burst
            await self.write(data * burst)
        await self.write(_frame(codec.FrameType.END, stream_id, b""))

    def take_frames(self, buffer: bytearray) -> int:
        offset, header = 0, codec.HEADER
        while len(buffer) - offset >= header.size:
            length, frame_type, stream_id = header.unpack_from(buffer, offset)
            if len(buffer) < offset + header.size + length:
                break
            if frame_type == codec.FrameType.DATA:
                self.answers += 1
                self.taken[stream_id] = self.taken.get(stream_id, 0) + length
            elif frame_type == codec.FrameType.WINDOW_UPDATE:
                self.credit[stream_id] += _U32.unpack_from(buffer, offset + header.size)[0]
                if (granted := self.credit_granted.pop(stream_id, None)) is not None:
                    granted.set()
            elif frame_type == codec.FrameType.END:
                self.open.discard(stream_id)
            elif frame_type == codec.FrameType.ERROR:  # code u16, flags u8, then the message
                message = bytes(buffer[offset + header.size + 3 : offset + header.size + length])
                raise RuntimeError(f"the worker sent ERROR on stream {stream_id}: {message.decode()}")
            offset += header.size + length
        return offset

    def owed(self) -> bytes:
        half_window = codec.DEFAULT_MAX_FRAME_SIZE  # the answer window is twice the frame limit
        owed = [(stream_id, size) for stream_id, size in self.taken.items() if size >= half_window]
        for stream_id, _ in owed:
            del self.taken[stream_id]
        return b"".join(_frame(codec.FrameType.WINDOW_UPDATE, i, _U32.pack(size)) for i, size in owed)


def bursts(count: int) -> list[int]:
    """How many messages go in each write, for ``count`` of them."""
    return [min(BURST, count - start) for start in range(0, count, BURST)]


def _frame(frame_type: codec.FrameType, stream_id: int, payload: bytes) -> bytes:
    return codec.HEADER.pack(len(payload), frame_type, stream_id) + payload


def _request_head(endpoint: str) -> bytes:
    """A REQUEST payload: the endpoint, no request id, no deadline, no metadata, an empty body."""
    name = endpoint.encode()
    return _U16.pack(len(name)) + name + _U16.pack(0) + _U32.pack(0) + _U16.pack(0)


async def receive(stream: trio.SocketStream, max_bytes: int = 65536) -> bytes:
    """What the server sent next; EOFError if it closed the connection (so nothing spins)."""
    data = await stream.receive_some(max_bytes)
    if not data:
        raise EOFError("the server closed the connection")
    return data


class RawDuplex(ThinDuplex):
    """A thin client of bench_raw_duplex_server.py: each message a frame, an empty frame the end."""

    @classmethod
    async def open(cls, address: tuple[str, int]) -> RawDuplex:
        return cls(await trio.open_tcp_stream(*address))

    async def send_messages(self, exchange: int, count: int) -> None:
        data = _RAW_HEADER.pack(len(MESSAGE), exchange) + MESSAGE
        for burst in bursts(count):
            await self.write(data * burst)
        await self.write(_RAW_HEADER.pack(0, exchange))

    def take_frames(self, buffer: bytearray) -> int:
        offset, header = 0, _RAW_HEADER
        while len(buffer) - offset >= header.size:
            length, exchange = header.unpack_from(buffer, offset)
            if len(buffer) < offset + header.size + length:
                break
            if length:
                self.answers += 1
            else:
                self.open.discard(exchange)
            offset += header.size + length
        return offset


async def thin_tcp_rate(
    open_conn: Callable[[tuple[str, int]], Awaitable[ThinDuplex]],
    address: tuple[str, int],
    exchanges: int,
    messages: int,
) -> float:
    conn = await open_conn(address)
    start = time.perf_counter()
    answers = await conn.run(exchanges, messages)
    elapsed = time.perf_counter() - start
    await conn.aclose()
    return _rate(answers, exchanges * messages, elapsed)


def _rate(answers: int, expected: int, elapsed: float) -> float:
    if answers != expected:
        raise RuntimeError(f"{answers} answers to {expected} messages")
    return answers / elapsed


# ---- the clients' own API: TcpClient.exchange() now, NatsClient.exchange() when it exists ------------


async def api_rate(
    connect: Callable[[], AbstractAsyncContextManager[Any]], exchanges: int, messages: int
) -> float:
    """Through a client's ``exchange()``: send/end in one task, ``async for`` the answers in another."""
    answers = 0

    async def one(client: Any) -> None:
        nonlocal answers
        async with client.exchange("chat") as exchange, trio.open_nursery() as nursery:
            nursery.start_soon(_send_then_end, exchange, messages)
            async for _ in exchange:
                answers += 1

    async with connect() as client:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(exchanges):
                nursery.start_soon(one, client)
        elapsed = time.perf_counter() - start
    return _rate(answers, exchanges * messages, elapsed)


async def _send_then_end(exchange: Any, messages: int) -> None:
    for _ in range(messages):
        await exchange.send({"max_tokens": 1})
    await exchange.end()


# ---- HTTP: a chunked HTTP/1.1 body, or h2c streams, written while the answers are read -------------------


class AnswerTally:
    """Counts answers in a byte stream however the reads split it, and sees a chunked body's end."""

    CHUNKED_END = b"\r\n0\r\n\r\n"

    def __init__(self) -> None:
        self.answers = 0
        self.tail = b""  # the last bytes seen: a mark or the end may straddle two reads

    def feed(self, data: bytes) -> None:
        window = self.tail + data
        self.answers += window.count(ANSWER_MARK) - self.tail.count(ANSWER_MARK)
        self.tail = window[-len(self.CHUNKED_END) :]

    @property
    def chunked_body_ended(self) -> bool:
        return self.tail.endswith(self.CHUNKED_END)


async def h1_exchange(address: tuple[str, int], messages: int) -> int:
    """One exchange on its own connection; the answers counted."""
    head = (
        b"POST /v1/chat HTTP/1.1\r\nhost: bench\r\ntransfer-encoding: chunked\r\n"
        b"accept: application/x-ndjson\r\n\r\n"
    )

    async def send_body(stream: trio.SocketStream) -> None:
        await stream.send_all(head)
        for burst in bursts(messages):
            await stream.send_all(b"%x\r\n%s\r\n" % (burst * len(LINE), LINE * burst))  # one chunk
        await stream.send_all(b"0\r\n\r\n")  # the end of the body: the half-close

    async with await trio.open_tcp_stream(*address) as stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_body, stream)
        return await _read_h1_answers(stream)


async def _read_h1_answers(stream: trio.SocketStream) -> int:
    received = b""
    while b"\r\n\r\n" not in received:
        received += await receive(stream)
    head, _, rest = received.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the server answered {head[:40]!r}")
    tally = AnswerTally()
    tally.feed(rest)
    while not tally.chunked_body_ended:
        tally.feed(await receive(stream))
    return tally.answers


async def h1_rate(address: tuple[str, int], exchanges: int, messages: int) -> float:
    counts: list[int] = []

    async def one() -> None:
        counts.append(await h1_exchange(address, messages))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(exchanges):
            nursery.start_soon(one)
    return _rate(sum(counts), exchanges * messages, time.perf_counter() - start)


class H2Duplex:
    """A thin h2c (prior knowledge) client on the h2 library: every exchange a stream of one connection,
    its body written within h2's flow control while its answers are counted. Reading never waits for
    a write (the window updates it owes go out from a task of their own): a worker that stops reading
    while its answers wait for the client would otherwise stop the client too."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        settings = {**self.conn.local_settings, h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_WINDOW}
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.tallies: dict[int, AnswerTally] = {}
        self.ended: dict[int, trio.Event] = {}
        self.window_opened = trio.Event()
        self.send_lock = trio.Lock()
        self.owes_write = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, address: tuple[str, int]) -> AsyncIterator[H2Duplex]:
        client = cls(await trio.open_tcp_stream(*address))
        client.conn.initiate_connection()
        client.conn.increment_flow_control_window(H2_WINDOW - client.conn.inbound_flow_control_window)
        async with client.stream, trio.open_nursery() as nursery:
            await client.flush()
            nursery.start_soon(client.read_loop)
            nursery.start_soon(client.write_loop)
            yield client
            nursery.cancel_scope.cancel()

    async def flush(self) -> None:
        async with self.send_lock:
            if data := self.conn.data_to_send():
                await self.stream.send_all(data)

    async def write_loop(self) -> None:
        while True:
            await self.owes_write.wait()
            self.owes_write = trio.Event()
            await self.flush()

    async def exchange(self, messages: int) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.tallies[stream_id], self.ended[stream_id] = AnswerTally(), trio.Event()
        headers = [(":method", "POST"), (":path", "/v1/chat"), (":scheme", "http"), (":authority", "bench")]
        self.conn.send_headers(stream_id, [*headers, ("accept", "application/x-ndjson")])
        while messages:
            while (window := self.conn.local_flow_control_window(stream_id)) < len(LINE):
                await self.window_opened.wait()
            burst = min(messages, BURST, window // len(LINE))
            messages -= burst
            self.conn.send_data(stream_id, LINE * burst)  # one DATA frame
            await self.flush()
        self.conn.end_stream(stream_id)
        await self.flush()
        await self.ended[stream_id].wait()
        return self.tallies.pop(stream_id).answers

    async def read_loop(self) -> None:
        while data := await self.stream.receive_some(65536):
            for event in self.conn.receive_data(data):
                self.on_event(event)
            self.owes_write.set()
        raise EOFError("the server closed the connection")

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self.tallies[event.stream_id].feed(event.data)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_opened.set()
            self.window_opened = trio.Event()
        elif isinstance(event, h2.events.StreamEnded):
            self.ended[event.stream_id].set()
        elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
            raise RuntimeError(f"the server reset the exchange: {event}")


async def h2_rate(address: tuple[str, int], exchanges: int, messages: int) -> float:
    counts: list[int] = []
    async with H2Duplex.open(address) as client:

        async def one() -> None:
            counts.append(await client.exchange(messages))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(exchanges):
                nursery.start_soon(one)
        elapsed = time.perf_counter() - start
    return _rate(sum(counts), exchanges * messages, elapsed)


# ---- memory: a caller that never reads ----------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    tried: int
    accepted: int  # messages in before send() was held back (all of them if it never was)
    held: int  # bytes the exchange holds (tracemalloc) while send() is held back, or at the end
    peak: int  # tracemalloc's peak over the attempt, from where it started


async def memory_attempts(sizes: Sizes) -> list[Attempt]:
    memory = MemoryTransport()
    tracemalloc.start()
    try:
        async with open_worker(create_mocker(), [memory], WorkerConfig(access_log=False)):
            return [await _attempt(memory, tried, sizes.hold) for tried in sizes.memory_attempts]
    finally:
        tracemalloc.stop()


async def _attempt(memory: MemoryTransport, tried: int, hold: float) -> Attempt:
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    call = memory.open("chat", b"")
    call.sink.gate = trio.Event()  # never set: the caller reads no answer, so the first one waits
    accepted = 0
    with trio.move_on_after(hold):  # send() blocks once flow control holds the caller back
        for _ in range(tried):
            await call.send({"max_tokens": 1})
            accepted += 1
    held, peak = tracemalloc.get_traced_memory()
    call.kill()
    await call.wait_done()
    return Attempt(tried, accepted, held - start, peak - start)


def memory_is_flat(attempts: list[Attempt]) -> bool:
    """Every attempt that was held back got the same messages in and cost the same, within 10%."""
    held_back = [a for a in attempts if a.accepted < a.tried]
    peaks = [a.peak for a in held_back]
    same_count = len({a.accepted for a in held_back}) == 1
    return len(held_back) >= 2 and same_count and max(peaks) <= 1.1 * min(peaks)


# ---- orchestration ------------------------------------------------------------------------------------

Measure = Callable[[int, int], Awaitable[float]]  # (exchanges, messages per exchange) -> messages/s


@dataclass(frozen=True)
class Row:
    transport: str
    exchanges: int
    ours: float
    baseline: float | None  # None: no baseline for this row
    goal: str


async def compare(
    transport: str, ours: Measure, baseline: Measure | None, total: int, sizes: Sizes, goal: str = ""
) -> list[Row]:
    """A row per count of exchanges, ``total`` messages shared among them: the median of the rounds,
    the project and the baseline alternating."""
    rows = []
    for exchanges in sizes.exchanges:
        progress(f"{transport}, {exchanges} exchange(s)")
        ours_rates, base_rates = [], []
        for _ in range(sizes.rounds):
            ours_rates.append(await one_round(transport, ours, exchanges, total))
            if baseline is not None:
                base_rates.append(await one_round(f"{transport} baseline", baseline, exchanges, total))
        base = statistics.median(base_rates) if base_rates else None
        rows.append(Row(transport, exchanges, statistics.median(ours_rates), base, goal))
    return rows


async def one_round(what: str, measure: Measure, exchanges: int, total: int) -> float:
    try:
        with trio.fail_after(ROUND_TIMEOUT):
            return await measure(exchanges, total // exchanges)
    except trio.TooSlowError:
        raise RuntimeError(f"{what}, {exchanges} exchange(s): not done in {ROUND_TIMEOUT:g} s") from None


async def tcp_rows(ours: tuple[str, int], raw: tuple[str, int], sizes: Sizes) -> list[Row]:
    thin_ours = partial(thin_tcp_rate, IngressDuplex.open, ours)
    thin_raw = partial(thin_tcp_rate, RawDuplex.open, raw)
    rows = await compare("tcp", thin_ours, thin_raw, sizes.tcp_messages, sizes, ">= 1.0x")
    # What a Python caller gets from the project's own client (it decodes every answer): no baseline,
    # the raw server has no client of that weight.
    with_client = partial(api_rate, partial(TcpClient.connect, *ours))
    return rows + await compare("tcp, TcpClient.exchange()", with_client, None, sizes.tcp_messages, sizes)


async def http_rows(ours: tuple[str, int], bare: tuple[str, int], sizes: Sizes) -> list[Row]:
    rows = []
    for transport, rate in (("http/1.1 chunked", h1_rate), ("h2c", h2_rate)):
        rows += await compare(transport, partial(rate, ours), partial(rate, bare), sizes.http_messages, sizes)
    return rows


async def nats_rows(sizes: Sizes) -> list[Row]:
    """NATS, through ``NatsClient.exchange()``; no baseline."""
    from transports.nats import NatsClient

    async with nats_server() as url, worker_process("--nats", url, "--namespace", "bench", "--no-access-log"):
        with_client = partial(api_rate, partial(NatsClient.connect, url, namespace="bench"))
        return await compare("nats, NatsClient.exchange()", with_client, None, sizes.nats_messages, sizes)


TABLE = "{:27} {:>9} {:>13} {:>14} {:>6}  {}"


def progress(message: str) -> None:
    print(f"bench_duplex: {message}", file=sys.stderr, flush=True)


def print_rows(rows: list[Row]) -> None:
    for row in rows:
        base = f"{row.baseline:.0f}" if row.baseline else "-"
        ratio = f"{row.ours / row.baseline:.2f}x" if row.baseline else "-"
        print(TABLE.format(row.transport, row.exchanges, f"{row.ours:.0f}", base, ratio, row.goal).rstrip())


def print_memory(attempts: list[Attempt]) -> None:
    print("memory transport, a caller that never reads (max_input_bytes 64 KiB):")
    print(f"  {'tried':>9} {'accepted':>9} {'held KiB':>9} {'peak KiB':>9}")
    for a in attempts:
        print(f"  {a.tried:9d} {a.accepted:9d} {a.held / 1024:9.1f} {a.peak / 1024:9.1f}")
    print(f"  flat: {'yes' if memory_is_flat(attempts) else 'NO'} (goal: flat)")


async def main(sizes: Sizes) -> None:
    # The worker of the memory section runs in this process: its log lines go with the progress.
    configure_logging(level="warning", stream=sys.stderr)
    with trio.fail_after(RUN_TIMEOUT):
        async with (
            worker_process("--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-access-log") as ours,
            spawn_process(RAW_SERVER) as raw,
            spawn_process(BARE_HTTP) as bare,
        ):
            rows = await tcp_rows(ours.addresses["tcp"], raw.addresses["tcp"], sizes)
            rows += await http_rows(ours.addresses["http"], bare.addresses["http"], sizes)
        print(TABLE.format("transport", "exchanges", "ingress msg/s", "baseline msg/s", "ratio", "goal"))
        print_rows(rows)
        print_rows(await nats_rows(sizes))
        progress("memory")
        print_memory(await memory_attempts(sizes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test")
    trio.run(main, QUICK if parser.parse_args().quick else FULL)
