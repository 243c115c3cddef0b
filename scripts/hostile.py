"""Hostile input, slow peers and signals, thrown from outside at real worker processes (issue 8).

Each class of input runs against its own ``ingress serve`` of the mocker (HTTP, TCP and ``--metrics`` on
ephemeral 127.0.0.1 ports, NATS through a nats-server of its own when the class needs it). The clients here
are written from the docs only (docs/protocol-tcp.md, docs/http.md, docs/protocol-nats.md,
docs/operations.md): raw sockets for TCP and HTTP/1.1, the ``h2`` state machine over a raw socket for
HTTP/2, plain nats-py (in a thread with its own asyncio loop) for NATS; the project's own clients are not
used. After each input the script checks that the worker is still alive and that a healthy ``generate``
stream and ``echo`` call are still served on every transport it serves, reads the worker's RSS from
/proc/PID/status before and after, then sends SIGTERM and records the exit code. It prints one table row
per input (PASS or FAIL with a short reason saying what came back) and exits 0 only if every row passed.
Rows with their own workers run side by side (a few at a time), and the classes that mostly wait run
beside the rest.

    python scripts/hostile.py                        # full run (about 75 s)
    python scripts/hostile.py --short                # the CI run (about 40 s)
    python scripts/hostile.py --only nested_json     # one class (comma-separated for several)
    python scripts/hostile.py --list                 # the class names

Every loop is bounded in count and time; each class has its own deadline and the script stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import random
import re
import resource
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import nats
import trio

from runtime.testing import WorkerProcess, nats_server, spawn_process, worker_process

# Every class must be over within this long (a hang is reported as a FAIL row, not waited for).
CLASS_TIMEOUT = 90.0
# One healthy request, or one reply to a hostile one, must arrive within this long.
REPLY_TIMEOUT = 3.0
# The error reply to a hostile input is immediate; a worker that died gives none at all.
BAD_REPLY_TIMEOUT = 2.0
# After a hostile input, time for a crash to show before the worker is declared alive.
SETTLE = 0.3
# SIGTERM at the end of a row: a healthy worker exits well within this.
EXIT_TIMEOUT = 10.0
# Class 13: a usage error is immediate; a worker still running this long is killed (it runs in the
# background, so the short mode keeps it).
USAGE_KILL_AFTER = 10.0
# "At once": an interpreter start and an argument check (0.5 s on an idle machine), far from the 30 s
# of retries a bad URL used to cost; generous because other classes load the machine meanwhile.
USAGE_PROMPT = 5.0
# The worker's drain settings where a row sends SIGTERM under load (class 5); kill_grace is the default.
DRAIN_TIMEOUT = 1.0
KILL_GRACE = 1.0
EXIT_SLACK = 2.0  # "a small constant": process teardown, hypercorn's own close
DEEP = b"[" * 100_000
SUPERSCRIPT_TWO = "\u00b2"
LONG_DIGITS = "9" * 5_000
BURST = 1024  # class 12: connections opened at once (the HTTP listener's backlog is 100 on main)
# Rows run side by side; each NATS row's worker gets its own namespace (queue group), so a request
# reaches the worker under test and no other.
PARALLEL_ROWS = 3
# A healthy worker's drain is instant; a worker stuck in a drain is reported, not waited for long.
BASE_ARGS = ("--no-access-log", "--drain-timeout", "2")


@dataclass(frozen=True)
class Mode:
    short: bool

    @property
    def memory_seconds(self) -> float:  # class 6: how long the non-reading h2 client holds its streams
        return 3.0 if self.short else 30.0

    @property
    def give_up_after(self) -> float:  # class 5: a worker still running this long after SIGTERM: killed
        return 10.0 if self.short else 20.0

    @property
    def fd_recovery(self) -> float:  # class 11: how long the worker may take to serve again
        return 5.0 if self.short else 15.0

    @property
    def resets(self) -> int:  # class 10: streams opened and reset per storm
        return 600

    @property
    def storms(self) -> int:  # class 10: a race; on main 4 storms leaked in 3 runs of 4, 8 in every run
        return 8 if self.short else 16


@dataclass
class Row:
    """One line of the table: one input thrown at one worker."""

    input: str
    transport: str
    alive: bool | None = None
    healthy: bool | None = None
    rss_before: float | None = None
    rss_after: float | None = None
    exit: str = "-"
    verdict: str = "FAIL"
    reason: str = ""


# --- worker processes ---------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """The process's resident set size in MB, from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def is_alive(worker: WorkerProcess) -> bool:
    return worker.process.poll() is None


async def terminate(worker: WorkerProcess) -> str:
    """SIGTERM, then the exit code as text ("killed" if it did not exit within EXIT_TIMEOUT)."""
    if worker.process.returncode is not None:
        return str(worker.process.returncode)
    worker.send_signal(signal.SIGTERM)
    with trio.move_on_after(EXIT_TIMEOUT):
        return str(await worker.wait_exit())
    worker.process.kill()
    await worker.wait_exit()
    return "killed"


@dataclass(frozen=True)
class Nats:
    """Where a worker serves NATS: the server and its own subject prefix."""

    url: str
    namespace: str


def serve_args(nats: Nats | None = None) -> list[str]:
    args = ["--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *BASE_ARGS]
    if nats is not None:
        args += ["--nats", nats.url, "--namespace", nats.namespace]
    return args


async def gather(rows: Sequence[Callable[[], Awaitable[Row]]]) -> list[Row]:
    """Run independent rows (each with its own worker) side by side, PARALLEL_ROWS at a time, in order."""
    results: list[Row | None] = [None] * len(rows)
    limiter = trio.CapacityLimiter(PARALLEL_ROWS)

    async def one(i: int) -> None:
        async with limiter:
            results[i] = await rows[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(rows)):
            nursery.start_soon(one, i)
    return [row for row in results if row is not None]


def raw_exceptions(worker: WorkerProcess) -> list[str]:
    """The exception lines of the tracebacks the worker printed outside its JSON log."""
    raw = [str(e["line"]).strip(" |+-") for e in worker.events if e.get("event") == "unparsed"]
    return [line for line in raw if re.match(r"[\w.]+(Error|Exception)\b.*:", line)]


def crash_line(worker: WorkerProcess) -> str:
    """What a dead worker said last: the exception line of its traceback, else its last log event."""
    errors = raw_exceptions(worker)
    if errors:
        return errors[-1][:150]
    return str(worker.events[-1].get("event")) if worker.events else "nothing"


async def finish_row(row: Row, worker: WorkerProcess, ok: bool, detail: str, nats: Nats | None = None) -> Row:
    """The common tail of a "the worker must survive this" row: alive, healthy, memory, exit code."""
    await trio.sleep(SETTLE)
    row.alive = is_alive(worker)
    unhealthy = await health_problems(worker, nats) if row.alive else ["dead"]
    row.healthy = not unhealthy
    row.rss_after = rss_mb(worker.pid)
    crash = "" if row.alive else f"; worker died (exit {worker.process.returncode}): {crash_line(worker)}"
    row.exit = await terminate(worker)
    passed = ok and row.alive and row.healthy and row.exit == "0"
    row.verdict = "PASS" if passed else "FAIL"
    problems = [detail]
    if row.alive and unhealthy:
        problems.append(f"alive but not served: {', '.join(unhealthy)}")
    if row.alive and row.exit != "0":
        problems.append(f"exit {row.exit} on SIGTERM{_forced(worker)}")
    row.reason = "; ".join(p for p in [*problems, _warnings(worker)] if p) + crash
    return row


def _innermost(exception: Any) -> str:
    """The innermost exception of a structlog JSON ``exception`` field, as ``Type: value``."""
    while isinstance(exception, list) and exception:
        last = exception[-1]
        if isinstance(last, list):
            exception = last
        elif isinstance(last, dict) and last.get("exceptions"):
            exception = last["exceptions"]
        elif isinstance(last, dict):
            return f"{last.get('exc_type')}: {str(last.get('exc_value'))[:60]}"
        else:
            break
    return ""


def _warnings(worker: WorkerProcess) -> str:
    """The worker's own warning and error events, counted by name: a hint at where a FAIL comes from."""
    warned = [e for e in worker.events if e.get("level") in ("warning", "error", "critical")]
    names = collections.Counter(str(e.get("event")) for e in warned)
    causes = {str(e.get("event")): _innermost(e.get("exception")) for e in reversed(warned)}
    logged = ", ".join(
        f"{name} x{count}" + (f" ({causes[name]})" if causes[name] else "")
        for name, count in names.most_common(4)
    )
    logged = f"worker logged {logged}" if logged else ""
    printed = raw_exceptions(worker) if is_alive(worker) or worker.process.returncode == 0 else []
    if printed:
        logged += (
            f"{'; ' if logged else ''}printed {len(printed)} raw traceback(s), last: {printed[-1][:100]}"
        )
    return logged


def _forced(worker: WorkerProcess) -> str:
    """What a forced drain killed, from the worker's own phase 3 line."""
    phase3 = [e for e in worker.events if e.get("event") == "shutdown.phase3.started"]
    if not phase3 or not phase3[-1].get("forced"):
        return ""
    return f" (drain forced: {phase3[-1].get('killed')} requests killed)"


async def survive(
    name: str,
    transport: str,
    attack: Callable[[WorkerProcess], Awaitable[tuple[bool, str]]],
    nats: Nats | None = None,
    budget: float = 2 * REPLY_TIMEOUT,
) -> Row:
    """Start a worker, throw ``attack`` at it, and check it survived. ``attack`` says whether the answer
    to the hostile input itself was right, and what it saw."""
    row = Row(name, transport)
    async with worker_process(*serve_args(nats)) as worker:
        row.rss_before = rss_mb(worker.pid)
        try:
            with trio.fail_after(budget):
                ok, detail = await attack(worker)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.TooSlowError,
            ValueError,
            KeyError,
            h2.exceptions.H2Error,
        ) as error:
            # ValueError and KeyError: an answer this script cannot parse (JSON, an HTTP head).
            ok, detail = False, f"the hostile exchange failed: {error!r}"[:200]
        return await finish_row(row, worker, ok, detail, nats)


# --- HTTP/1.1 over a raw socket -----------------------------------------------------------------


def h1_request(
    method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = (), close: bool = True
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: hostile"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"content-length: {len(body)}")
    if close:
        lines.append("connection: close")
    # Latin-1, as ASGI decodes header bytes: '²' goes out as the one byte 0xB2.
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


async def h1_exchange(address: tuple[str, int], raw: bytes, read_for: float = REPLY_TIMEOUT) -> bytes:
    """Send ``raw`` on a new connection and read until the server closes it (or ``read_for`` s)."""
    data = bytearray()
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(raw)
        with trio.move_on_after(read_for):
            while chunk := await _receive(stream):
                data += chunk
    return bytes(data)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:  # a reset: the same as a close here
        return b""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the body is as long as Content-Length said (or the chunked body ended)


def parse_response(data: bytes, head_only: bool = False) -> Response | None:
    """One HTTP/1.1 response (the first in ``data``), or None if there is no status line."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if head_only:
        return Response(status, headers, b"", True)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(rest)
        return Response(status, headers, body, complete)
    length = int(headers.get("content-length", len(rest)))
    return Response(status, headers, rest[:length], len(rest) >= length)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return bytes(body), False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), True
        body += data[:size]
        data = data[size + 2 :]


async def h1_healthy(address: tuple[str, int]) -> bool:
    """A generate stream (SSE, every token, then the end event) and an echo call over HTTP/1.1."""
    body = json.dumps({"max_tokens": 5}).encode()
    stream = parse_response(await h1_exchange(address, h1_request("POST", "/v1/generate", body)))
    echo = parse_response(await h1_exchange(address, h1_request("POST", "/v1/echo", b'{"ping":1}')))
    streamed = (
        stream is not None and stream.status == 200 and b'event: end\ndata: {"chunks":5}' in stream.body
    )
    return streamed and echo is not None and echo.status == 200 and json.loads(echo.body) == {"ping": 1}


# --- the TCP protocol over a raw socket ---------------------------------------------------------

MAGIC = b"TINGRESS"
FRAME_HEADER = struct.Struct(">IBI")
HELLO, REQUEST, DATA, END, ERROR, STOP, KILL, GOAWAY = range(8)
FRAME_NAMES = ("HELLO", "REQUEST", "DATA", "END", "ERROR", "STOP", "KILL", "GOAWAY")
BAD_REQUEST = 1


def hello(version: int = 1, max_frame_size: int = 1 << 20, max_streams: int = 128) -> bytes:
    return FRAME_HEADER.pack(10, HELLO, 0) + struct.pack(">HII", version, max_frame_size, max_streams)


def request_frame(stream_id: int, endpoint: str, body: bytes, timeout_ms: int = 0) -> bytes:
    name = endpoint.encode()
    payload = struct.pack(">H", len(name)) + name + struct.pack(">HIH", 0, timeout_ms, 0) + body
    return FRAME_HEADER.pack(len(payload), REQUEST, stream_id) + payload


@dataclass(frozen=True)
class Frame:
    kind: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> int:
        return int(struct.unpack_from(">H", self.payload)[0]) if self.kind == ERROR else 0


@dataclass
class TcpConn:
    """A raw client connection: frames in, bytes out; the server's magic is skipped when it comes."""

    stream: trio.SocketStream
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0
    magic_checked: bool = False
    eof: bool = False

    @classmethod
    async def open(cls, address: tuple[str, int], greeting: bytes | None = None) -> TcpConn:
        """Send the magic and HELLO (or ``greeting``, as it is); with the normal greeting, wait for the
        server's HELLO before anything else is sent, as the protocol says."""
        conn = cls(await trio.open_tcp_stream(*address))
        await conn.stream.send_all(MAGIC + hello() if greeting is None else greeting)
        if greeting is None:
            frame = await conn.next_frame()
            if frame is None or frame.kind != HELLO:
                raise OSError(f"no HELLO from the server: {frame}")
        return conn

    async def next_frame(self) -> Frame | None:
        """The next frame from the server, or None at EOF."""
        while (frame := self._parse()) is None:
            chunk = await _receive(self.stream)
            if not chunk:
                self.eof = True
                return None
            self.buffer += chunk
            self.received += len(chunk)
        return frame

    def _parse(self) -> Frame | None:
        if not self.magic_checked and len(self.buffer) >= len(MAGIC):
            if self.buffer.startswith(MAGIC):
                del self.buffer[: len(MAGIC)]
            self.magic_checked = True
        if not self.magic_checked or len(self.buffer) < FRAME_HEADER.size:
            return None
        length, kind, stream_id = FRAME_HEADER.unpack_from(self.buffer)
        if len(self.buffer) < FRAME_HEADER.size + length:
            return None
        payload = bytes(self.buffer[FRAME_HEADER.size : FRAME_HEADER.size + length])
        del self.buffer[: FRAME_HEADER.size + length]
        return Frame(kind, stream_id, payload)


async def tcp_collect(conn: TcpConn, streams: set[int]) -> dict[int, list[Frame]]:
    """Read until every stream in ``streams`` has its END or ERROR (or EOF): the frames per stream."""
    frames: dict[int, list[Frame]] = {sid: [] for sid in streams}
    open_streams = set(streams)
    while open_streams:
        frame = await conn.next_frame()
        if frame is None:
            break
        frames.setdefault(frame.stream_id, []).append(frame)
        if frame.kind in (END, ERROR):
            open_streams.discard(frame.stream_id)
    return frames


def tcp_completed(frames: list[Frame], tokens: int) -> bool:
    """The stream sent ``tokens`` DATA chunks in order and then END."""
    data = [json.loads(frame.payload) for frame in frames if frame.kind == DATA]
    return bool(frames) and frames[-1].kind == END and [d["index"] for d in data] == list(range(tokens))


async def tcp_healthy(address: tuple[str, int]) -> bool:
    """A generate stream and an echo call on one multiplexed connection."""
    conn = await TcpConn.open(address)
    async with conn.stream:
        generate = request_frame(1, "generate", b'{"max_tokens":5}')
        await conn.stream.send_all(generate + request_frame(3, "echo", b'{"ping":1}'))
        frames = await tcp_collect(conn, {1, 3})
    echo = frames[3]
    answered = len(echo) == 2 and echo[1].kind == END and json.loads(echo[0].payload) == {"ping": 1}
    return tcp_completed(frames[1], 5) and answered


# --- NATS through plain nats-py (its own asyncio loop, in a thread) -----------------------------


@dataclass(frozen=True)
class NatsReply:
    kind: str
    data: bytes


async def _aio_exchange(
    url: str, subject: str, payload: bytes, headers: dict[str, str] | None, wait: float
) -> list[NatsReply]:
    """asyncio: publish one request and collect its replies until a final one (result, end, error)."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subject, payload, reply=inbox, headers=headers)
        replies: list[NatsReply] = []
        deadline = time.monotonic() + wait
        while not replies or replies[-1].kind not in ("result", "end", "error"):
            msg = await sub.next_msg(timeout=max(0.01, deadline - time.monotonic()))
            kind = (msg.headers or {}).get("Ingress-Kind", "")
            if kind == "probe":  # the worker asking whether we are still here: we are
                await msg.respond(b"")
                continue
            replies.append(NatsReply(kind, msg.data))
        return replies
    finally:
        await nc.close()


async def nats_exchange(
    target: Nats,
    endpoint: str,
    payload: bytes,
    headers: dict[str, str] | None = None,
    wait: float = REPLY_TIMEOUT,
) -> list[NatsReply]:
    """Trio: one request and its replies; raises on a timeout (``wait`` s) or a connection failure.
    The asyncio side bounds itself: a thread cannot be cancelled from Trio."""

    def run() -> list[NatsReply]:
        subject = f"{target.namespace}.{endpoint}"
        return asyncio.run(_aio_exchange(target.url, subject, payload, headers, wait))

    return await trio.to_thread.run_sync(run)


async def nats_healthy(target: Nats) -> bool:
    try:
        stream = await nats_exchange(target, "generate", b'{"max_tokens":5}')
        echo = await nats_exchange(target, "echo", b'{"ping":1}')
    except Exception:  # a timeout, no responders: not healthy, whatever nats-py calls it
        return False
    tokens = [json.loads(reply.data)["index"] for reply in stream if reply.kind == "data"]
    streamed = tokens == list(range(5)) and stream[-1].kind == "end"
    return streamed and echo[-1].kind == "result" and json.loads(echo[-1].data) == {"ping": 1}


async def health_problems(worker: WorkerProcess, nats: Nats | None = None) -> list[str]:
    """The transports on which the worker no longer answers a generate stream and an echo call."""
    checks: list[tuple[str, Callable[[], Awaitable[bool]]]] = []
    if "http" in worker.addresses:
        checks.append(("http", lambda: h1_healthy(worker.addresses["http"])))
        checks.append(("h2", lambda: h2_healthy(worker.addresses["http"])))
    if "tcp" in worker.addresses:
        checks.append(("tcp", lambda: tcp_healthy(worker.addresses["tcp"])))
    if nats is not None:
        checks.append(("nats", lambda: nats_healthy(nats)))
    problems = []
    for name, check in checks:
        try:
            with trio.fail_after(REPLY_TIMEOUT):
                if not await check():
                    problems.append(f"{name} (wrong answer)")
        except (
            OSError,
            trio.BrokenResourceError,
            ValueError,
            KeyError,
            h2.exceptions.ProtocolError,
        ) as error:
            problems.append(f"{name} ({type(error).__name__})")
        except trio.TooSlowError:
            problems.append(f"{name} (no answer in {REPLY_TIMEOUT:g} s)")
    return problems


# --- HTTP/2 through the h2 state machine --------------------------------------------------------


@dataclass
class H2Conn:
    stream: trio.SocketStream
    conn: h2.connection.H2Connection
    send_lock: trio.Lock = field(default_factory=trio.Lock)  # a reader task flushes too (PING acks)

    @classmethod
    async def open(cls, address: tuple[str, int], big_windows: bool = False, rcvbuf: int = 0) -> H2Conn:
        """A prior-knowledge h2c connection. ``big_windows`` opens the flow-control windows wide, so
        only TCP (the kernel's buffers) can hold the server back; ``rcvbuf`` shrinks those."""
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(address)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        if big_windows:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            conn.increment_flow_control_window(2**31 - 1 - 65535)
        client = cls(trio.SocketStream(sock), conn)
        await client.flush()
        return client

    async def flush(self) -> None:
        async with self.send_lock:
            if data := self.conn.data_to_send():
                await self.stream.send_all(data)

    def post(self, path: str, body: bytes) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "hostile")]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        return stream_id


async def h2_healthy(address: tuple[str, int]) -> bool:
    """A generate stream and an echo call on one h2 connection (reading and acknowledging everything)."""
    client = await H2Conn.open(address)
    bodies: dict[int, bytearray] = {}
    statuses: dict[int, bytes] = {}
    async with client.stream:
        generate = client.post("/v1/generate", b'{"max_tokens":5}')
        echo = client.post("/v1/echo", b'{"ping":1}')
        await client.flush()
        ended: set[int] = set()
        while ended != {generate, echo}:
            data = await _receive(client.stream)
            if not data:
                return False
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = dict(event.headers).get(b":status", b"")
                elif isinstance(event, h2.events.DataReceived):
                    bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                    client.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended.add(event.stream_id)
            await client.flush()
    streamed = b'event: end\ndata: {"chunks":5}' in bodies.get(generate, b"")
    answered = json.loads(bodies.get(echo, b"null")) == {"ping": 1}
    return statuses == {generate: b"200", echo: b"200"} and streamed and answered


# --- the classes of input -----------------------------------------------------------------------


async def nats_input(mode: Mode) -> list[Row]:
    """1. NATS: bodies and timeout headers that used to kill the worker get BAD_REQUEST."""
    inputs: list[tuple[str, bytes, dict[str, str] | None]] = [
        ("100,000 '[' body", DEEP, None),
        ("Ingress-Timeout-Ms: '²'", b'{"max_tokens":1}', {"Ingress-Timeout-Ms": SUPERSCRIPT_TWO}),
        ("Ingress-Timeout-Ms: 5,000 digits", b'{"max_tokens":1}', {"Ingress-Timeout-Ms": LONG_DIGITS}),
    ]
    rows = []
    async with nats_server() as url:
        for i, (name, payload, headers) in enumerate(inputs):
            target = Nats(url, f"hostile{i}")

            async def attack(
                worker: WorkerProcess,
                p: bytes = payload,
                h: dict[str, str] | None = headers,
                t: Nats = target,
            ) -> tuple[bool, str]:
                try:
                    replies = await nats_exchange(t, "generate", p, h, wait=BAD_REPLY_TIMEOUT)
                except Exception as error:  # no reply at all: a timeout or no responders
                    return False, f"no reply in {BAD_REPLY_TIMEOUT:g} s ({type(error).__name__})"
                last = replies[-1]
                code = json.loads(last.data).get("code") if last.kind == "error" else None
                return code == "BAD_REQUEST", f"reply kind={last.kind} code={code}"

            rows.append(functools.partial(survive, name, "nats", attack, target))
        return await gather(rows)


OPS_PATHS = ("/health", "/ready", "/metrics", "/no-such-path")
ODD_REQUESTS: tuple[tuple[str, bytes], ...] = (
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("BREW", b"BREW /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("DELETE", b"DELETE /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ("POST body", b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc"),
    ("HTTP/9.9", b"GET /health HTTP/9.9\r\nhost: x\r\n\r\n"),
    ("garbage", b"\x00\xff\x16\x03\x01garbage\r\n\r\n"),
)


async def _probe_listener(worker: WorkerProcess, listener: str, odd: bool) -> tuple[bool, str]:
    """HEAD to every path (or every odd request): each gets a parsable response or a plain close."""
    address = worker.addresses[listener]
    probes = [(f"HEAD {p}", h1_request("HEAD", p)) for p in OPS_PATHS] if not odd else list(ODD_REQUESTS)
    seen: list[str] = []
    for name, raw in probes:
        try:
            data = await h1_exchange(address, raw, read_for=2.0)
        except OSError:
            return False, f"{name}: connection refused after {', '.join(seen)}"
        response = parse_response(data, head_only=name.startswith("HEAD"))
        if response is None and data:
            return False, f"{name}: not an HTTP response: {data[:60]!r}"
        seen.append(f"{name}={response.status if response else 'close'}")
        await trio.sleep(0.05)  # a crash takes a moment to show
        if not is_alive(worker):
            return False, f"worker died after {', '.join(seen)}"
    return True, " ".join(seen)


async def ops_head(mode: Mode) -> list[Row]:
    """2. HEAD, odd methods and garbage to the --metrics listener and the HTTP port."""
    rows = []
    for listener in ("metrics", "http"):
        for odd in (False, True):
            name = "odd methods, garbage" if odd else "HEAD /health /ready /metrics /x"

            async def attack(worker: WorkerProcess, li: str = listener, o: bool = odd) -> tuple[bool, str]:
                return await _probe_listener(worker, li, o)

            rows.append(functools.partial(survive, name, f"{listener} port", attack))
    return await gather(rows)


async def _nested_tcp(worker: WorkerProcess) -> tuple[bool, str]:
    """Stream 1 streams; once it has, stream 3 sends 100,000 '['; stream 1 must finish untouched."""
    tokens = 200
    conn = await TcpConn.open(worker.addresses["tcp"])
    async with conn.stream:
        await conn.stream.send_all(request_frame(1, "generate", b'{"max_tokens":%d,"itl_ms":5}' % tokens))
        first = await conn.next_frame()
        await conn.stream.send_all(request_frame(3, "echo", DEEP))
        frames = await tcp_collect(conn, {1, 3})
    sibling = ([first] if first else []) + frames[1]
    bad = frames[3]
    on_connection = [FRAME_NAMES[f.kind] for f in frames.get(0, [])]
    bad_ok = len(bad) == 1 and bad[0].kind == ERROR and bad[0].error_code == BAD_REQUEST
    sibling_ok = tcp_completed(sibling, tokens)
    got_bad = ", ".join(
        FRAME_NAMES[f.kind] + (f" code {f.error_code}" if f.kind == ERROR else "") for f in bad
    )
    got = f"bad stream 3 got [{got_bad}]; sibling stream 1 got {sum(f.kind == DATA for f in sibling)}"
    connection = (
        f", then the connection closed (stream 0 got {on_connection or 'nothing'})" if conn.eof else ""
    )
    return (
        bad_ok and sibling_ok,
        f"{got}/{tokens} chunks, last frame {FRAME_NAMES[sibling[-1].kind] if sibling else None}{connection}",
    )


async def _bad_http(worker: WorkerProcess, body: bytes, timeout_header: str | None) -> tuple[bool, str]:
    """A 400 with the JSON error body (BAD_REQUEST) and an x-request-id header."""
    headers = [("x-request-timeout-ms", timeout_header)] if timeout_header is not None else []
    raw = h1_request("POST", "/v1/echo", body, headers)
    response = parse_response(await h1_exchange(worker.addresses["http"], raw))
    if response is None:
        return False, "no HTTP response"
    try:
        code = json.loads(response.body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    ok = response.status == 400 and code == "BAD_REQUEST" and "x-request-id" in response.headers
    rid = "x-request-id" if "x-request-id" in response.headers else "no x-request-id"
    return ok, f"status {response.status}, body {response.body[:60]!r}, {rid}"


async def nested_json(mode: Mode) -> list[Row]:
    """3. Deeply nested JSON on a multiplexed TCP connection; the same and bad timeouts over HTTP."""
    rows = [functools.partial(survive, "100,000 '[' beside a stream", "tcp", _nested_tcp)]
    http_inputs = [
        ("100,000 '[' body", DEEP, None),
        ("X-Request-Timeout-Ms: '²'", b"{}", SUPERSCRIPT_TWO),
        ("X-Request-Timeout-Ms: 5,000 digits", b"{}", LONG_DIGITS),
    ]
    for name, body, timeout in http_inputs:

        async def attack(worker: WorkerProcess, b: bytes = body, t: str | None = timeout) -> tuple[bool, str]:
            return await _bad_http(worker, b, t)

        rows.append(functools.partial(survive, name, "http/1.1", attack))
    return await gather(rows)


def _strict_json(data: bytes) -> bool:
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    try:
        json.loads(data, parse_constant=refuse)
    except ValueError:
        return False
    return True


async def nan(mode: Mode) -> list[Row]:
    """4. echo of [NaN, Infinity] (Python's json accepts them): whatever comes back must be strict JSON."""
    body = b"[NaN, Infinity, -Infinity]"

    async def over_http(worker: WorkerProcess) -> tuple[bool, str]:
        response = parse_response(
            await h1_exchange(worker.addresses["http"], h1_request("POST", "/v1/echo", body))
        )
        if response is None:
            return False, "no HTTP response"
        return _strict_json(response.body), f"status {response.status}, body {response.body[:60]!r}"

    async def over_tcp(worker: WorkerProcess) -> tuple[bool, str]:
        conn = await TcpConn.open(worker.addresses["tcp"])
        async with conn.stream:
            await conn.stream.send_all(request_frame(1, "echo", body))
            frames = (await tcp_collect(conn, {1}))[1]
        data = [f.payload for f in frames if f.kind == DATA]
        ok = all(_strict_json(d) for d in data) and bool(frames)
        return ok, f"frames {[(f.kind, f.payload[:40]) for f in frames]}"

    name = "echo [NaN, Infinity]"
    return await gather(
        [
            functools.partial(survive, name, "http/1.1", over_http),
            functools.partial(survive, name, "tcp", over_tcp),
        ]
    )


# --- slow peers, signals and drains -------------------------------------------------------------

Peer = Callable[[WorkerProcess, trio.Event], Awaitable[None]]
ENDLESS = b'{"max_tokens":10000000}'  # the mocker's limit: a stream that outlives any test


async def _h1_non_reader(worker: WorkerProcess, stalled: trio.Event) -> None:
    """An HTTP/1.1 client that asks for an endless stream and never reads it."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(worker.addresses["http"])
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(h1_request("POST", "/v1/generate", ENDLESS, close=False))
        stalled.set()
        await trio.sleep_forever()


async def _h2_non_reader(worker: WorkerProcess, stalled: trio.Event) -> None:
    """An h2 client with wide-open windows that asks for an endless stream and never reads it."""
    client = await H2Conn.open(worker.addresses["http"], big_windows=True, rcvbuf=4096)
    async with client.stream:
        client.post("/v1/generate", ENDLESS)
        await client.flush()
        stalled.set()
        await trio.sleep_forever()


async def _h2_ping_flood(worker: WorkerProcess, stalled: trio.Event) -> None:
    """An h2 client with nothing in flight that sends PINGs and never reads the acks."""
    client = await H2Conn.open(worker.addresses["http"], rcvbuf=4096)
    async with client.stream:
        for batch in range(1000):  # bounded; in practice the send blocks long before
            for i in range(100):
                client.conn.ping(struct.pack(">II", batch, i))
            await client.flush()
            stalled.set()
        await trio.sleep_forever()


async def _until_cut(peer: Peer, worker: WorkerProcess, stalled: trio.Event) -> None:
    """Run ``peer``; a worker that hangs up on it (say, on a PING flood) has not failed the test."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await peer(worker, stalled)
    stalled.set()


async def _slow_shutdown_row(name: str, transport: str, mode: Mode, peer: Peer) -> Row:
    """SIGTERM while ``peer`` holds the worker: it must exit within drain + kill grace + a constant."""
    row = Row(name, transport)
    args = ("--http", "127.0.0.1:0", "--no-access-log", "--drain-timeout", str(DRAIN_TIMEOUT))
    async with worker_process(*args) as worker, trio.open_nursery() as nursery:
        row.rss_before = rss_mb(worker.pid)
        stalled = trio.Event()
        nursery.start_soon(_until_cut, peer, worker, stalled)
        with trio.move_on_after(REPLY_TIMEOUT):
            await stalled.wait()
        await trio.sleep(1.0)  # time for the worker's sends to fill the socket buffers
        row.alive = is_alive(worker)
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError):
            with trio.fail_after(REPLY_TIMEOUT):
                row.healthy = await h1_healthy(worker.addresses["http"])
        row.rss_after = rss_mb(worker.pid)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code: int | None = None
        with trio.move_on_after(mode.give_up_after):
            code = await worker.wait_exit()
        took = time.monotonic() - started
        nursery.cancel_scope.cancel()
    limit = DRAIN_TIMEOUT + KILL_GRACE + EXIT_SLACK
    row.exit = "killed" if code is None else str(code)
    passed = code in (0, 3) and took <= limit and bool(row.alive) and bool(row.healthy)
    row.verdict = "PASS" if passed else "FAIL"
    phases = [str(e["event"]) for e in worker.events if str(e.get("event")).startswith("shutdown.")]
    ending = (
        f"still running {took:.1f} s after SIGTERM, killed"
        if code is None
        else f"exited {code} after {took:.1f} s"
    )
    row.reason = (
        f"{ending} (limit {limit:g} s = drain {DRAIN_TIMEOUT:g} + kill grace {KILL_GRACE:g} + {EXIT_SLACK:g})"
    )
    if not row.healthy:
        row.reason += "; a healthy request failed while the peer stalled"
    if code is None:
        row.reason += f"; its last shutdown line: {phases[-1] if phases else 'none'}"
    return row


async def slow_shutdown(mode: Mode) -> list[Row]:
    """5. Non-reading HTTP/1.1 and h2 clients, and an h2 PING flood, at SIGTERM (in parallel)."""
    peers = [
        ("non-reading client, endless stream", "http/1.1", _h1_non_reader),
        ("non-reading client, endless stream", "h2", _h2_non_reader),
        ("PING flood, nothing in flight", "h2", _h2_ping_flood),
    ]
    return await gather([functools.partial(_slow_shutdown_row, *peer[:2], mode, peer[2]) for peer in peers])


# A worker whose non-reading h2 streams are held back grows by a few buffers (1-3 MB seen), not by the
# stream; on today's main it grows about 10 MB/s.
MEMORY_GROWTH_LIMIT_MB = 15.0


async def h2_memory(mode: Mode) -> list[Row]:
    """6. Ten endless h2 streams whose client never reads: the worker's RSS must stay bounded."""

    async def attack(worker: WorkerProcess) -> tuple[bool, str]:
        # A plain client: default windows and socket buffers (shrinking the buffer hides the growth).
        client = await H2Conn.open(worker.addresses["http"])
        async with client.stream:
            for _ in range(10):
                client.post("/v1/generate", ENDLESS)
            await client.flush()
            start = rss_mb(worker.pid) or 0.0
            samples = []
            for _ in range(3):
                await trio.sleep(mode.memory_seconds / 3)
                samples.append(rss_mb(worker.pid) or 0.0)
        growth = samples[-1] - start
        trail = " -> ".join(f"{s:.0f}" for s in [start, *samples])
        return (
            growth <= MEMORY_GROWTH_LIMIT_MB,
            f"RSS {trail} MB over {mode.memory_seconds:g} s (limit +{MEMORY_GROWTH_LIMIT_MB:g})",
        )

    row = Row("10 non-reading streams", "h2")
    async with worker_process(*serve_args()) as worker:
        row.rss_before = rss_mb(worker.pid)
        with trio.fail_after(mode.memory_seconds + REPLY_TIMEOUT):
            ok, detail = await attack(worker)
        return [await finish_row(row, worker, ok, detail, None)]


async def _read_one_response(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """One complete response from a keep-alive connection (Content-Length bodies), or what arrived
    before EOF (empty: an empty reply)."""
    while True:
        head, sep, _ = bytes(buffer).partition(b"\r\n\r\n")
        if sep:
            response = parse_response(bytes(buffer))
            length = len(head) + 4 + int((response.headers if response else {}).get("content-length", 0))
            if len(buffer) >= length:
                raw = bytes(buffer[:length])
                del buffer[:length]
                return raw
        chunk = await _receive(stream)
        if not chunk:
            raw = bytes(buffer)
            buffer.clear()
            return raw
        buffer += chunk


def _describe(raw: bytes) -> str:
    """A bad reply in a few words: its status, and its body bytes against its Content-Length."""
    response = parse_response(raw)
    if response is None:
        return f"{len(raw)} bytes: {raw[:40]!r}"
    length = response.headers.get("content-length", "?")
    after, connection = response.headers.get("retry-after"), response.headers.get("connection")
    return (
        f"{response.status} with {len(response.body)} of {length} body bytes {response.body[:100]!r},"
        f" Retry-After {after}, Connection {connection}"
    )


async def _keepalive_client(
    address: tuple[str, int], tally: collections.Counter[str], examples: dict[str, str], until: float
) -> None:
    """Loop echo requests on one keep-alive connection until the server closes it (bounded by time)."""
    async with await trio.open_tcp_stream(*address) as stream:
        buffer = bytearray()
        while time.monotonic() < until:
            await stream.send_all(h1_request("POST", "/v1/echo", b'{"k":1}', close=False))
            raw = await _read_one_response(stream, buffer)
            outcome = _classify_keepalive(raw)
            tally[outcome] += 1
            if outcome not in ("200", "503 ok"):
                examples.setdefault(outcome, _describe(raw))
            if outcome != "200":
                return


def _classify_keepalive(raw: bytes) -> str:
    if not raw:
        return "empty reply"
    response = parse_response(raw)
    if response is None:
        return "cut head"
    if response.status == 503 and not response.complete:
        return "503 short body"
    if not response.complete:
        return f"{response.status} short body"
    if response.status == 503:
        if "retry-after" not in response.headers:
            return "503 without Retry-After"
        return "503 ok" if response.headers.get("connection", "").lower() == "close" else "503 keeps alive"
    return str(response.status)


async def keepalive_drain(mode: Mode) -> list[Row]:
    """7. Sixty keep-alive clients looping requests when SIGTERM arrives: no empty or short replies."""
    row = Row("60 keep-alive clients at SIGTERM", "http/1.1")
    tally: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    args = ("--http", "127.0.0.1:0", "--no-access-log", "--drain-timeout", "5")
    async with worker_process(*args) as worker:
        row.rss_before = rss_mb(worker.pid)
        row.alive = True
        until = time.monotonic() + 5.0
        async with trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(_keepalive_client, worker.addresses["http"], tally, examples, until)
            await trio.sleep(0.5)
            row.healthy = tally["200"] > 0
            row.rss_after = rss_mb(worker.pid)
            worker.send_signal(signal.SIGTERM)
        with trio.move_on_after(EXIT_TIMEOUT):
            row.exit = str(await worker.wait_exit())
    bad = {k: v for k, v in tally.items() if k not in ("200", "503 ok")}
    row.verdict = "PASS" if not bad and row.exit == "0" else "FAIL"
    row.reason = ", ".join(f"{k}={v}" for k, v in sorted(tally.items()))
    row.reason += "".join(
        f"; e.g. {example}" for outcome, example in examples.items() if outcome != "empty reply"
    )
    return [row]


async def sighup(mode: Mode) -> list[Row]:
    """8. SIGHUP mid-stream must drain like SIGTERM: the streams complete and the worker exits 0."""
    row = Row("SIGHUP mid-stream", "tcp + http/1.1")
    tokens = 100
    body = b'{"max_tokens":%d,"itl_ms":10}' % tokens
    async with worker_process(*serve_args()) as worker:
        row.rss_before = rss_mb(worker.pid)
        conn = await TcpConn.open(worker.addresses["tcp"])
        results: dict[str, bool] = {}
        async with conn.stream, trio.open_nursery() as nursery:
            http_started = trio.Event()

            async def over_http() -> None:
                data = bytearray()
                async with await trio.open_tcp_stream(*worker.addresses["http"]) as stream:
                    await stream.send_all(h1_request("POST", "/v1/generate", body))
                    with trio.move_on_after(EXIT_TIMEOUT):
                        while chunk := await _receive(stream):
                            data += chunk
                            if b"data:" in data:  # the stream is running: now the signal may come
                                http_started.set()
                http_started.set()
                response = parse_response(bytes(data))
                results["http"] = (
                    response is not None and b'event: end\ndata: {"chunks":%d}' % tokens in response.body
                )

            nursery.start_soon(over_http)
            await conn.stream.send_all(request_frame(1, "generate", body))
            first = await conn.next_frame()
            with trio.move_on_after(REPLY_TIMEOUT):
                await http_started.wait()
            worker.send_signal(signal.SIGHUP)
            await trio.sleep(0.2)
            row.alive = is_alive(worker)
            row.rss_after = rss_mb(worker.pid)
            with trio.move_on_after(REPLY_TIMEOUT):
                frames = (await tcp_collect(conn, {1}))[1]
                results["tcp"] = tcp_completed(([first] if first else []) + frames, tokens)
        with trio.move_on_after(EXIT_TIMEOUT):
            row.exit = str(await worker.wait_exit())
        if row.exit == "-":
            row.exit = await terminate(worker)
    row.healthy = results.get("tcp", False) and results.get("http", False)
    row.verdict = "PASS" if row.alive and row.healthy and row.exit == "0" else "FAIL"
    tcp, sse = results.get("tcp", False), results.get("http", False)
    row.reason = f"tcp stream complete={tcp}, sse stream complete={sse}, exit {row.exit}"
    if not row.alive:
        row.reason += (
            f"; died at once (exit {worker.process.returncode}), last log line: {crash_line(worker)}"
        )
    return [row]


async def tcp_hello(mode: Mode) -> list[Row]:
    """9. HELLO and a REQUEST in one write are answered; a bad HELLO gets an ERROR frame before close."""

    async def together(worker: WorkerProcess) -> tuple[bool, str]:
        greeting = MAGIC + hello() + request_frame(1, "echo", b'{"x":1}')
        conn = await TcpConn.open(worker.addresses["tcp"], greeting)
        frames: dict[int, list[Frame]] = {}
        greeted = False
        async with conn.stream:
            with trio.move_on_after(2.0):
                first = await conn.next_frame()
                greeted = first is not None and first.kind == HELLO
                frames = await tcp_collect(conn, {1})
        answer = [FRAME_NAMES[f.kind] for f in frames.get(1, [])]
        detail = (
            f"server HELLO {'received' if greeted else 'not received'}; stream 1 got {answer or 'nothing'}"
        )
        return answer == ["DATA", "END"], f"{detail} within 2 s, no further bytes sent"

    rows = [functools.partial(survive, "HELLO + REQUEST in one write", "tcp", together)]
    bad_hellos = [
        ("HELLO version 0", MAGIC + hello(version=0)),
        ("HELLO max_frame_size 100", MAGIC + hello(max_frame_size=100)),
        ("HELLO max_streams 0", MAGIC + hello(max_streams=0)),
        ("bad magic", b"XINGRESS" + hello()),
    ]
    for name, greeting in bad_hellos:

        async def attack(worker: WorkerProcess, g: bytes = greeting) -> tuple[bool, str]:
            conn = await TcpConn.open(worker.addresses["tcp"], g)
            frames = []
            async with conn.stream:
                with trio.move_on_after(3.0):
                    while (frame := await conn.next_frame()) is not None:
                        frames.append(frame)
            error = [f for f in frames if f.kind == ERROR and f.stream_id == 0]
            seen = [f"{FRAME_NAMES[f.kind]} on {f.stream_id} {f.payload[3:50]!r}" for f in frames]
            ending = "EOF" if conn.eof else "still open after 3 s"
            got = f"frames [{', '.join(seen)}]" if frames else f"{conn.received} bytes, no frame"
            return bool(error) and conn.eof, f"{got}, then {ending}"

        rows.append(functools.partial(survive, name, "tcp", attack))
    return await gather(rows)


async def _metric_sum(address: tuple[str, int], name: str) -> float | None:
    response = parse_response(await h1_exchange(address, h1_request("GET", "/metrics")))
    if response is None:
        return None
    values = [
        line.rsplit(" ", 1)[1]
        for line in response.body.decode().splitlines()
        if line.split("{")[0].split(" ")[0] == name
    ]
    return sum(float(v) for v in values)


RESET_BATCH = 10


async def _reset_storm(address: tuple[str, int], streams: int, rng: random.Random) -> None:
    """Open ``streams`` short generate streams on one connection, ten at a time, and reset each batch
    0-6 ms later: some before their handler starts, some while it runs, some as it ends."""
    client = await H2Conn.open(address)
    async with client.stream, trio.open_nursery() as nursery:

        async def drain() -> None:  # read and acknowledge what the server sends, so it never waits for us
            while data := await _receive(client.stream):
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    for event in client.conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            client.conn.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                    await client.flush()

        nursery.start_soon(drain)
        for _ in range(streams // RESET_BATCH):
            batch = [client.post("/v1/generate", b'{"max_tokens":5,"itl_ms":1}') for _ in range(RESET_BATCH)]
            await client.flush()
            await trio.sleep(rng.random() * 0.006)
            for stream_id in batch:
                with contextlib.suppress(h2.exceptions.StreamClosedError):  # it ended first
                    client.conn.reset_stream(stream_id, error_code=8)  # CANCEL
            await client.flush()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


SETTLE_LIMIT = 2.0


async def _settled_inflight(address: tuple[str, int]) -> float | None:
    """The in-flight gauge once it reaches 0, or its value after 2 s (the mocker's 5 tokens take 4 ms,
    and the storm's connections are closed: nothing may still run)."""
    value = None
    for _ in range(int(SETTLE_LIMIT / 0.1)):
        value = await _metric_sum(address, "ingress_inflight_requests")
        if value == 0:
            break
        await trio.sleep(0.1)
    return value


# How long the fake engine may take to finish cancelling what the bridge abandoned after a storm.
ENGINE_SETTLE_LIMIT = 10.0


async def _settled_engine(address: tuple[str, int]) -> tuple[float, float]:
    """The fake engine's running gauge once it reaches 0 (0 without an engine mocker), or its value
    after ENGINE_SETTLE_LIMIT; and how long that took."""
    started = trio.current_time()
    running = 0.0
    for _ in range(int(ENGINE_SETTLE_LIMIT / 0.1)):
        running = await _metric_sum(address, "mocker_engine_running")
        if not running:
            break
        await trio.sleep(0.1)
    return running, round(trio.current_time() - started, 1)


async def rapid_reset(mode: Mode) -> list[Row]:
    """10. h2 rapid-reset storms: afterwards ingress_inflight_requests is back at 0."""

    async def attack(worker: WorkerProcess) -> tuple[bool, str]:
        address, gauges, rng = worker.addresses["http"], [], random.Random(1)
        for _ in range(mode.storms):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(_reset_storm, address, mode.resets // 3, rng)
            await trio.sleep(SETTLE)
            gauges.append(await _metric_sum(address, "ingress_inflight_requests"))
        final = await _settled_inflight(address)
        trail = ", ".join(f"{g:g}" if g is not None else "?" for g in gauges)
        detail = (
            f"in-flight {SETTLE:g} s after each storm: [{trail}]; {SETTLE_LIMIT:g} s after the last: {final}"
        )
        # With an engine mocker (INGRESS_APP=runtime.mocker:aio_worker): nothing generates for nobody.
        # Requests the bridge gave up waiting for (engine.abandoned, after ABORT_TIMEOUT: thousands of
        # aborts at once keep the asyncio side busy) are still being cancelled there: they must end
        # too, within a bound.
        engine, waited = await _settled_engine(address)
        if engine:
            detail += f"; the fake engine still runs {engine:g} requests after {waited:g} s"
        elif waited:
            detail += f"; the fake engine idle {waited:g} s later"
        return final == 0 and not engine, detail

    name = f"rapid-reset storms, {mode.storms} x {mode.resets} streams"
    budget = mode.storms * (REPLY_TIMEOUT + SETTLE_LIMIT) + ENGINE_SETTLE_LIMIT
    return [await survive(name, "h2", attack, budget=budget)]


FD_LIMIT = 64
FD_FLOOD = 200  # connections per port, well past the limit
WARNING_LINES_LIMIT = 5


async def fd_limit(mode: Mode) -> list[Row]:
    """11. RLIMIT_NOFILE=64, then more connections than that: a few warnings at most, then serve again."""
    row = Row(f"{FD_FLOOD} connections per port, RLIMIT_NOFILE={FD_LIMIT}", "http + tcp")
    command = ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--", sys.executable, "-m", "runtime", "serve"]
    command += ["--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0", *BASE_ARGS, "--log-format", "json"]
    async with spawn_process(command) as worker:
        row.rss_before = rss_mb(worker.pid)
        logged_before = len(worker.events)
        async with trio.open_nursery() as nursery:
            for port in ("http", "tcp"):
                for _ in range(FD_FLOOD):
                    nursery.start_soon(_hold_connection, worker.addresses[port], 1.0)
        recovered = await _served_again_after(worker, mode.fd_recovery)
        lines = worker.events[logged_before:]
        # A connection closed before its handshake is one protocol error each, logged by design; the
        # accept loop's noise is everything else at warning level or above, and raw (traceback) lines.
        per_connection = sum(e.get("event") == "tcp.protocol_error" for e in lines)
        noisy = [
            e
            for e in lines
            if e.get("event") == "unparsed"
            or (e.get("level") in ("warning", "error", "critical") and e.get("event") != "tcp.protocol_error")
        ]
        tracebacks = sum(str(e.get("line", "")).lstrip(" |+").startswith("Traceback") for e in noisy)
        emfile = [str(e.get("line", e.get("event"))) for e in noisy if "EMFILE" in str(e)]
        ok = len(noisy) <= WARNING_LINES_LIMIT and recovered is not None
        detail = (
            f"{len(noisy)} warning/error/raw log lines (limit {WARNING_LINES_LIMIT}):"
            f" {tracebacks} tracebacks,"
            f" {len(emfile)} x {emfile[0][:60] if emfile else 'no EMFILE line'!r};"
            f" besides {per_connection} tcp.protocol_error lines; "
            + (
                f"served again {recovered:.1f} s after the flood"
                if recovered is not None
                else f"not served again within {mode.fd_recovery:g} s of the flood"
            )
        )
        return [await finish_row(row, worker, ok, detail, None)]


async def _served_again_after(worker: WorkerProcess, limit: float) -> float | None:
    """Seconds until every transport serves again once the flood is over (None: not within ``limit``)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if not await health_problems(worker):
            return time.monotonic() - started
        await trio.sleep(0.5)
    return None


async def _hold_connection(address: tuple[str, int], seconds: float) -> None:
    with contextlib.suppress(OSError), trio.move_on_after(seconds + 2.0):
        async with await trio.open_tcp_stream(*address):
            await trio.sleep(seconds)


async def burst(mode: Mode) -> list[Row]:
    """12. 1,024 connections to the HTTP port at once, one request each: the time until all answered."""
    row = Row(f"{BURST} connects at once", "http/1.1")
    answered = 0

    async def one(address: tuple[str, int]) -> None:
        nonlocal answered
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            response = parse_response(await h1_exchange(address, h1_request("GET", "/health"), 30.0))
            answered += response is not None and response.status == 200

    async with worker_process(*serve_args()) as worker:
        row.rss_before = rss_mb(worker.pid)
        started = time.monotonic()
        with trio.move_on_after(40.0):
            async with trio.open_nursery() as nursery:
                for _ in range(BURST):
                    nursery.start_soon(one, worker.addresses["http"])
        took = time.monotonic() - started
        ok = answered == BURST
        return [await finish_row(row, worker, ok, f"{answered}/{BURST} answered in {took:.2f} s", None)]


async def bad_nats_url(mode: Mode) -> list[Row]:
    """13. ``--nats notaurl`` and ``--nats http://127.0.0.1:1``: a usage error, exit 2, at once."""

    async def one(url: str) -> Row:
        row = Row(f"serve --nats {url}", "cli")
        async with worker_process("--nats", url, "--no-access-log", wait_ready=False) as worker:
            started = time.monotonic()
            with trio.move_on_after(USAGE_KILL_AFTER):
                row.exit = str(await worker.wait_exit())
            took = time.monotonic() - started
            if row.exit == "-":
                worker.process.kill()
                row.exit = "killed"
        said = [str(e.get("line", e.get("event"))) for e in worker.events]
        usage = any("usage" in s.lower() or s.startswith("ingress:") for s in said)
        row.verdict = "PASS" if row.exit == "2" and took < USAGE_PROMPT and usage else "FAIL"
        row.reason = f"exit {row.exit} after {took:.1f} s; said: {' | '.join(s[:70] for s in said[:2])}"
        return row

    return await gather([functools.partial(one, url) for url in ("notaurl", "http://127.0.0.1:1")])


CLASSES: dict[str, Callable[[Mode], Awaitable[list[Row]]]] = {
    "nats_input": nats_input,
    "ops_head": ops_head,
    "nested_json": nested_json,
    "nan": nan,
    "slow_shutdown": slow_shutdown,
    "h2_memory": h2_memory,
    "keepalive_drain": keepalive_drain,
    "sighup": sighup,
    "tcp_hello": tcp_hello,
    "rapid_reset": rapid_reset,
    "fd_limit": fd_limit,
    "burst": burst,
    "bad_nats_url": bad_nats_url,
}


# --- the run ------------------------------------------------------------------------------------


# Classes that mostly wait (on a worker stalled by a peer, retrying a bad URL, or out of fds) run beside
# the others; none of them measures time finer than seconds.
BACKGROUND = ("slow_shutdown", "bad_nats_url", "fd_limit")


async def run_class(name: str, mode: Mode, took: dict[str, float]) -> list[tuple[str, Row]]:
    """One class, bounded: a hang or an unexpected exception becomes a FAIL row, not a stuck script."""
    started = time.monotonic()
    try:
        with trio.fail_after(CLASS_TIMEOUT):
            rows = await CLASSES[name](mode)
    except trio.TooSlowError:
        rows = [Row("(the whole class)", "-", reason=f"did not finish within {CLASS_TIMEOUT:g} s")]
    except Exception as error:  # the script's own failure must still be a row, and not hide the rest
        traceback.print_exception(error, file=sys.stderr)
        rows = [Row("(the whole class)", "-", reason=f"script error: {error!r}"[:200])]
    took[name] = time.monotonic() - started
    return [(name, row) for row in rows]


def _mark(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _memory(row: Row) -> str:
    before = "-" if row.rss_before is None else f"{row.rss_before:.0f}"
    after = "-" if row.rss_after is None else f"{row.rss_after:.0f}"
    return f"{before}->{after}"


def print_table(results: list[tuple[str, Row]]) -> None:
    header = ("class", "input", "transport", "alive", "healthy", "RSS MB", "exit", "verdict", "reason")
    lines = [
        (
            name,
            r.input,
            r.transport,
            _mark(r.alive),
            _mark(r.healthy),
            _memory(r),
            r.exit,
            r.verdict,
            r.reason,
        )
        for name, r in results
    ]
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header) - 1)]
    for line in [header, *lines]:
        print(
            "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False))
            + "  "
            + line[-1]
        )


async def main(mode: Mode, names: list[str]) -> int:
    started = time.monotonic()
    by_class: dict[str, list[tuple[str, Row]]] = {}
    took: dict[str, float] = {}

    async def in_background(name: str) -> None:
        by_class[name] = await run_class(name, mode, took)

    async with trio.open_nursery() as nursery:
        for name in names:
            if name in BACKGROUND:
                nursery.start_soon(in_background, name)
        for name in names:
            if name not in BACKGROUND:
                by_class[name] = await run_class(name, mode, took)
    results = [row for name in names for row in by_class[name]]
    print_table(results)
    failed = sum(row.verdict == "FAIL" for _, row in results)
    print("seconds per class: " + ", ".join(f"{name} {took[name]:.1f}" for name in names))
    print(f"hostile: {len(results)} rows, {failed} FAIL, {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


def _raise_fd_limit() -> None:
    """The burst opens 1,024 sockets at once from this process (and the worker inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="the CI run: shorter holds and give-ups")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these classes (see --list)")
    parser.add_argument("--list", action="store_true", help="print the class names and stop")
    options = parser.parse_args()
    if options.list:
        for name, function in CLASSES.items():
            print(f"{name:16} {(function.__doc__ or '').strip()}")
        return
    names = options.only.split(",") if options.only else list(CLASSES)
    unknown = [name for name in names if name not in CLASSES]
    if unknown:
        parser.error(f"unknown class {', '.join(unknown)}; --list shows them")
    _raise_fd_limit()
    sys.exit(trio.run(main, Mode(options.short), names))


if __name__ == "__main__":
    cli()
