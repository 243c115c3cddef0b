"""Chaos for the HTTP transport: cut HTTP/1.1 and HTTP/2 streams and exchanges, slowloris, SIGTERM under
load.

Runs a real worker process (the mocker, HTTP only) on 127.0.0.1 and drives it in two rounds, like
scripts/chaos_tcp.py:

1. SSE streams over HTTP/1.1 (raw sockets) and HTTP/2 (the h2 library), and full-duplex exchanges (the
   mocker's ``chat``) over both: the request body streams NDJSON messages in (HTTP/1.1: chunked, through
   h11) while the NDJSON answers are read, so the two directions overlap. A share of the connections is
   cut mid-stream or mid-exchange: HTTP/1.1 half with a clean close, half with a reset (SO_LINGER 0);
   HTTP/2 by closing the connection. A few slowloris connections dribble a request head the whole time.
   Afterwards /metrics must show in-flight back at 0, disconnects counted, and the worker's exchange
   message counters within what the callers sent and read.
2. A rolling restart: the same load with SIGTERM once a share of the streams and exchanges is running,
   the worker started with ``--shutdown-delay``, and a load-balancer task polling /ready that stops
   routing new work once it reads 503 (as Kubernetes does). Streams and exchanges routed before that must
   complete (an exchange's caller goes on sending through the drain) or get an explicit error; the
   worker must exit 0. (A request that reaches a worker in the instant it exits can get no answer from
   any server; readiness plus shutdown_delay is what keeps traffic out of that instant, and that is what
   this round checks. The 503 answer to callers that ignore readiness is covered by tests/test_http.py.)

Every stream ends completed (all tokens, then the end event), with an explicit error, or cut by this
script; anything else (a stream that stops without an end or error event, a hang) is a violation. Every
exchange likewise, checked in sequence on both sides (scripts/_chaos.py, ``ExchangeCheck``).

    python scripts/chaos_http.py            # full run
    python scripts/chaos_http.py --short    # CI run
    python scripts/chaos_http.py --secure   # with --auth-tokens and TLS on (HTTPS, ALPN h2/http/1.1)
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import signal
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import httpx
import trio
from _chaos import (
    ExchangeLedger,
    SilentCut,
    Tally,
    check_engine_idle,
    check_exchange_counters,
    inflight_from_metrics,
    record_exchange,
    run_cli,
)
from _secure import Secure, secured

from runtime import Unavailable, decode_error
from runtime._tls import client_context
from runtime.testing import worker_process

STREAM_TIMEOUT = 60.0  # a stream still open this long after it started is a hang: a violation
RUN_TIMEOUT = 180.0  # the whole script stops by itself after this long
SLOWLORIS_BYTE_INTERVAL = 0.05
# The load balancer's readiness probe period, well inside the worker's shutdown delay below.
LB_PROBE_INTERVAL = 0.05
SHUTDOWN_DELAY = "0.5"
# How long in-flight may take to come back to 0 once every caller is done (an HTTP caller can read the
# last byte before the worker's handler has returned and been counted): a leak stays, however long.
SETTLE = 5.0


@dataclass(frozen=True)
class Load:
    h1_streams: int
    h2_streams: int
    h1_exchanges: int
    h2_exchanges: int
    cut_share: float
    slowloris: int

    @property
    def per_round(self) -> int:
        return self.h1_streams + self.h2_streams + self.h1_exchanges + self.h2_exchanges


class Wire:
    """How this run's connections are made: cleartext, or (``--secure``) TLS with the run's certificate,
    ALPN for the HTTP version, and the token on every request."""

    def __init__(self) -> None:
        self.secure: Secure | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}

    @property
    def scheme(self) -> str:
        return "https" if self.secure else "http"

    def headers(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.secure.token}")] if self.secure else []

    async def open(self, address: tuple[str, int], alpn: str) -> Stream:
        """A connection; OSError if it cannot be made (the TLS handshake included: a listener closing)."""
        stream = await trio.open_tcp_stream(*address)
        if self.secure is None:
            return stream
        if alpn not in self._contexts:
            self._contexts[alpn] = client_context(self.secure.cafile)
            self._contexts[alpn].set_alpn_protocols([alpn])
        tls = trio.SSLStream(stream, self._contexts[alpn], server_hostname=address[0])
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(stream)
            raise OSError(f"TLS handshake failed: {exc!r}") from exc
        return tls


WIRE = Wire()
Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@contextlib.asynccontextmanager
async def _closing(stream: Stream) -> AsyncIterator[Stream]:
    try:
        yield stream
    finally:
        await _close(stream)


async def _close(stream: Stream) -> None:
    """Close, even a connection whose socket a cut already closed (TLS would try its close_notify)."""
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        await trio.aclose_forcefully(stream)


def _raw_socket(stream: Stream) -> socket.socket:
    return (stream.transport_stream if isinstance(stream, trio.SSLStream) else stream).socket  # type: ignore[return-value]


def _request(max_tokens: int) -> bytes:
    body = json.dumps({"max_tokens": max_tokens, "itl_ms": 2}).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in WIRE.headers())
    head = f"POST /v1/generate HTTP/1.1\r\nhost: chaos\r\n{extra}content-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _classify(body: bytes, max_tokens: int, status: int) -> str | None:
    """The outcome of a finished response, or None if it ended without saying how (a violation)."""
    if status != 200:
        try:
            return f"error:{json.loads(body)['error']['code']}"
        except (ValueError, KeyError):
            return None
    if b"event: error" in body:
        return "error:" + json.loads(body.split(b"event: error\ndata: ")[1].split(b"\n")[0])["error"]["code"]
    if body.count(b'"token"') == max_tokens and b'event: end\ndata: {"chunks":%d}' % max_tokens in body:
        return "completed"
    return None


async def h1_stream(address: tuple[str, int], tally: Tally, rng: random.Random, cut: str | None) -> None:
    max_tokens = rng.randint(20, 200)
    try:
        stream = await WIRE.open(address, "http/1.1")
    except OSError:
        tally.outcomes["error:REFUSED"] += 1  # the listener is closed: explicit, safe to retry
        return
    async with _closing(stream):
        with trio.move_on_after(STREAM_TIMEOUT) as timer:
            await stream.send_all(_request(max_tokens))
            data = bytearray()
            cut_after = rng.randint(1, 10) if cut else None
            while not data.endswith(b"\r\n0\r\n\r\n") and not _complete_fixed_length(data):
                chunk = await _receive(stream)
                if chunk is None:
                    break
                data += chunk
                if cut_after is not None and data.count(b'"token"') >= cut_after:
                    _cut(stream, cut)
                    tally.outcomes[f"cut:{cut}"] += 1
                    return
                if data.count(b'"token"') == 1:
                    tally.stream_started()
        if timer.cancelled_caught:
            tally.violations.append(f"HTTP/1.1 stream hung after {data.count(b'token')} tokens")
            return
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
    outcome = _classify(body, max_tokens, status)
    if outcome is None:
        tally.violations.append(
            f"HTTP/1.1 stream ended without an end or error event (status {status}): {bytes(data)[-300:]!r}"
        )
    else:
        tally.outcomes[outcome] += 1


def _complete_fixed_length(data: bytearray) -> bool:
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep or b"content-length:" not in head.lower():
        return False
    return len(body) >= int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])


async def _receive(stream: Stream) -> bytes | None:
    try:
        data = await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return None
    return data or None


def _cut(stream: Stream, how: str | None) -> None:
    sock = _raw_socket(stream)  # under TLS too: the socket goes, no close_notify
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def h2_stream(address: tuple[str, int], tally: Tally, rng: random.Random, cut: bool) -> None:
    """One stream per HTTP/2 connection, so cutting the connection cuts exactly that stream."""
    max_tokens = rng.randint(20, 200)
    try:
        stream = await WIRE.open(address, "h2")
    except OSError:
        tally.outcomes["error:REFUSED"] += 1
        return
    async with _closing(stream):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "POST"),
            (":path", "/v1/generate"),
            (":scheme", WIRE.scheme),
            (":authority", "chaos"),
            *WIRE.headers(),
        ]
        conn.send_headers(1, headers)
        conn.send_data(1, json.dumps({"max_tokens": max_tokens, "itl_ms": 2}).encode(), end_stream=True)
        await stream.send_all(conn.data_to_send())
        body, status, outcome = bytearray(), 0, None
        cut_after = rng.randint(1, 10) if cut else None
        with trio.move_on_after(STREAM_TIMEOUT) as timer:
            while outcome is None:
                data = await _receive(stream)
                if data is None:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        outcome = _classify(bytes(body), max_tokens, status) or "violation"
                    elif isinstance(event, h2.events.StreamReset):
                        outcome = "error:H2_STREAM_REFUSED"  # reset before any response: not processed
                if b'"token"' in body and body.count(b'"token"') == 1:
                    tally.stream_started()
                if cut_after is not None and body.count(b'"token"') >= cut_after and outcome is None:
                    _raw_socket(stream).close()
                    tally.outcomes["cut:h2-close"] += 1
                    return
                await stream.send_all(conn.data_to_send())
    if timer.cancelled_caught:
        tally.violations.append("HTTP/2 stream hung")
    elif outcome in (None, "violation"):
        tally.violations.append(f"HTTP/2 stream ended without an end or error event (status {status})")
    else:
        tally.outcomes[outcome] += 1


# ---- exchanges: the request body streams in while the answers stream out ------------------------------


class HttpExchanges:
    """``exchange()`` over raw HTTP, in the shape ``record_exchange`` drives (``TcpClient.exchange()``'s):
    each message one NDJSON line of the request body, written while the NDJSON answer is read (httpx
    would send the whole body first). One connection per exchange, so that cutting it cuts exactly that
    exchange; ``cut`` does it like a crashed peer, the socket first."""

    def __init__(self, address: tuple[str, int], *, http2: bool) -> None:
        self.address = address
        self.http2 = http2
        self.current: H1Exchange | H2Exchange | None = None

    def exchange(self, endpoint: str) -> H1Exchange | H2Exchange:
        self.current = (H2Exchange if self.http2 else H1Exchange)(self.address, endpoint)
        return self.current

    def cut(self, how: str) -> None:
        if self.current is not None and self.current.stream is not None:
            _cut(self.current.stream, how)


class _NdjsonAnswers:
    """What both versions share: the connection, and the answer body split into NDJSON lines."""

    def __init__(self, address: tuple[str, int], endpoint: str) -> None:
        self.address = address
        self.path = f"/v1/{endpoint}"
        self.stream: Stream | None = None
        self._lines: collections.deque[bytes] = collections.deque()
        self._partial = b""
        self._status = 0
        self._ended = False

    ALPN = "http/1.1"

    async def _connect(self) -> Stream:
        try:
            self.stream = await WIRE.open(self.address, self.ALPN)
        except OSError as exc:  # the listener is closed: nothing started, safe to retry
            raise Unavailable(f"connection refused: {exc}", retryable=True) from exc
        return self.stream

    async def __aexit__(self, *exc_info: object) -> None:
        if self.stream is not None:
            await _close(self.stream)

    def __aiter__(self) -> _NdjsonAnswers:
        return self

    async def __anext__(self) -> Any:
        while not self._lines:
            if self._ended:
                raise StopAsyncIteration
            await self._read_more()
        line = self._lines.popleft()
        try:
            answer = json.loads(line)
        except ValueError:
            raise SilentCut(f"HTTP {self._status}, a line that is not JSON: {line[:200]!r}") from None
        if isinstance(answer, dict) and set(answer) == {"error"}:
            raise decode_error(answer["error"])  # an error status's body, or the stream's last line
        if self._status != 200:
            raise SilentCut(f"HTTP {self._status} without an error body: {line[:200]!r}")
        return answer

    async def _read_more(self) -> None:
        raise NotImplementedError

    async def _receive(self) -> bytes:
        assert self.stream is not None
        try:
            return await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def _body(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        self._lines.extend(line for line in lines if line.strip())

    def _body_ended(self) -> None:
        if self._partial.strip():  # an error body has no final newline
            self._lines.append(self._partial)
        self._partial, self._ended = b"", True


class H1Exchange(_NdjsonAnswers):
    """HTTP/1.1 through h11: the body chunked (``Transfer-Encoding: chunked``), one chunk per message."""

    def __init__(self, address: tuple[str, int], endpoint: str) -> None:
        super().__init__(address, endpoint)
        self._h11 = h11.Connection(h11.CLIENT)

    async def __aenter__(self) -> H1Exchange:
        stream = await self._connect()
        headers = [
            ("host", "chaos"),
            ("transfer-encoding", "chunked"),
            ("accept", "application/x-ndjson"),
            *WIRE.headers(),
        ]
        try:
            await stream.send_all(
                self._h11.send(h11.Request(method="POST", target=self.path, headers=headers))
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:  # closed before reading it
            raise Unavailable(f"the connection closed before the request: {exc!r}", retryable=True) from exc
        return self

    async def send(self, message: Any) -> None:
        await self._write(h11.Data(data=json.dumps(message).encode() + b"\n"))

    async def end(self) -> None:
        await self._write(h11.EndOfMessage())

    async def _write(self, event: h11.Data | h11.EndOfMessage) -> None:
        assert self.stream is not None
        try:
            await self.stream.send_all(self._h11.send(event))
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Unavailable(f"the exchange's input is closed: {exc!r}", retryable=False) from exc

    async def _read_more(self) -> None:
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:  # the connection closed mid-body
            raise SilentCut(f"HTTP/1.1: {exc}") from None
        if event is h11.NEED_DATA:
            self._h11.receive_data(await self._receive())
        elif isinstance(event, h11.Response):
            self._status = event.status_code
        elif isinstance(event, h11.Data):
            self._body(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            self._body_ended()
        elif isinstance(event, h11.ConnectionClosed):
            raise SilentCut("HTTP/1.1: the connection closed before a response")


class H2Exchange(_NdjsonAnswers):
    """HTTP/2 through the h2 library: one stream, a DATA frame per message, the END_STREAM flag as the
    half-close. The sender and the reader both write (acknowledgements), one at a time."""

    ALPN = "h2"

    def __init__(self, address: tuple[str, int], endpoint: str) -> None:
        super().__init__(address, endpoint)
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._writing = trio.Lock()

    async def __aenter__(self) -> H2Exchange:
        await self._connect()
        self._h2.initiate_connection()
        headers = [
            (":method", "POST"),
            (":path", self.path),
            (":scheme", WIRE.scheme),
            (":authority", "chaos"),
        ]
        headers += WIRE.headers()
        self._h2.send_headers(1, [*headers, ("accept", "application/x-ndjson")])
        try:
            await self._flush()
        except Unavailable as exc:
            raise Unavailable(exc.message, retryable=True) from exc
        return self

    async def send(self, message: Any) -> None:
        try:
            self._h2.send_data(1, json.dumps(message).encode() + b"\n")
        except h2.exceptions.ProtocolError as exc:  # the stream is closed (ended or reset)
            raise Unavailable(f"the exchange's input is closed: {exc!r}", retryable=False) from exc
        await self._flush()

    async def end(self) -> None:
        try:
            self._h2.end_stream(1)
        except h2.exceptions.ProtocolError as exc:
            raise Unavailable(f"the exchange's input is closed: {exc!r}", retryable=False) from exc
        await self._flush()

    async def _flush(self) -> None:
        assert self.stream is not None
        async with self._writing:
            data = self._h2.data_to_send()
            try:
                if data:
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Unavailable(f"the connection is closed: {exc!r}", retryable=False) from exc

    async def _read_more(self) -> None:
        data = await self._receive()
        if not data:
            raise SilentCut("HTTP/2: the connection closed before the stream ended")
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise SilentCut(f"HTTP/2: {exc!r}") from None
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self._status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                self._body(event.data)
                self._h2.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded):
                self._body_ended()
            elif isinstance(event, h2.events.StreamReset):
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:  # not processed: retry elsewhere
                    raise Unavailable("HTTP/2 stream refused", retryable=True)
                raise SilentCut(f"HTTP/2 stream reset ({event.error_code!r}), status {self._status}")
        with contextlib.suppress(Unavailable):  # the answers so far count; the next read says how it ended
            await self._flush()


async def http_exchange(
    address: tuple[str, int],
    tally: Tally,
    rng: random.Random,
    ledger: ExchangeLedger,
    *,
    http2: bool,
    cut: str | None,
) -> None:
    """One exchange; records exactly one outcome, or ``exchange:cut:<cut>`` if this script cut it (after
    1 to 10 answers, like a stream; "reset" with SO_LINGER 0, "close" and "h2-close" cleanly)."""
    client = HttpExchanges(address, http2=http2)
    cut_after = rng.randint(1, 10) if cut else None
    recorded = False
    with trio.CancelScope() as scope:

        def on_answer(count: int) -> None:
            if count == 1:
                tally.stream_started()
            if cut is not None and cut_after is not None and count >= cut_after:
                client.cut(cut)
                scope.cancel()

        try:
            await record_exchange(client, tally, rng, STREAM_TIMEOUT, ledger, on_answer)
            recorded = True  # record_exchange records every ending except being cancelled by our own cut
        finally:
            if not recorded:
                tally.outcomes[f"exchange:cut:{cut}"] += 1


async def slowloris(address: tuple[str, int], stop: trio.Event) -> None:
    """Dribble a request head one byte at a time until told to stop (or the worker closes on us)."""
    head = b"POST /v1/echo HTTP/1.1\r\nhost: chaos\r\nx-padding: " + b"a" * 10_000
    try:
        async with _closing(await WIRE.open(address, "http/1.1")) as stream:
            for byte in head:
                if stop.is_set():
                    return
                await stream.send_all(bytes([byte]))
                await trio.sleep(SLOWLORIS_BYTE_INTERVAL)
    except (OSError, trio.BrokenResourceError):
        return


async def drive(
    address: tuple[str, int],
    load: Load,
    tally: Tally,
    rng: random.Random,
    routed_away: trio.Event,
    ledger: ExchangeLedger,
) -> tuple[int, int]:
    """Start the round's streams and exchanges (in a shuffled order), staggered, until the load balancer
    routes away; returns how many streams and how many exchanges."""
    kinds = ["h1"] * load.h1_streams + ["h2"] * load.h2_streams
    kinds += ["h1-exchange"] * load.h1_exchanges + ["h2-exchange"] * load.h2_exchanges
    rng.shuffle(kinds)
    streams = exchanges = 0
    async with trio.open_nursery() as nursery:
        for i, kind in enumerate(kinds):
            if routed_away.is_set():
                break
            cut = ("close" if i % 2 else "reset") if rng.random() < load.cut_share else None
            if kind == "h1":
                nursery.start_soon(h1_stream, address, tally, rng, cut)
                streams += 1
            elif kind == "h2":
                nursery.start_soon(h2_stream, address, tally, rng, cut is not None)
                streams += 1
            else:
                http2 = kind == "h2-exchange"
                if http2 and cut:
                    cut = "h2-close"  # as for h2 streams: the connection closed
                exchange = partial(http_exchange, http2=http2, cut=cut)
                nursery.start_soon(exchange, address, tally, rng, ledger)
                exchanges += 1
            await trio.sleep(rng.random() * 0.01)
    return streams, exchanges


async def load_balancer(address: tuple[str, int], routed_away: trio.Event) -> None:
    """Poll /ready like a readiness probe; stop routing to this worker at the first failure."""
    url = f"http://{address[0]}:{address[1]}/ready"
    async with httpx.AsyncClient() as http:
        while True:
            try:
                if (await http.get(url)).status_code != 200:
                    break
            except httpx.HTTPError:
                break
            await trio.sleep(LB_PROBE_INTERVAL)
    routed_away.set()


async def run(load: Load, tally: Tally, report: dict[str, object], rng: random.Random) -> int:
    with trio.fail_after(RUN_TIMEOUT):
        args = (
            "--http",
            "127.0.0.1:0",
            "--metrics",  # probes and scrapes: cleartext and open even when the HTTP port is not
            "127.0.0.1:0",
            "--no-access-log",
            "--drain-timeout",
            "30",
            "--shutdown-delay",
            SHUTDOWN_DELAY,
            *(WIRE.secure.serve_args if WIRE.secure else ()),
        )
        async with worker_process(*args) as worker, trio.open_nursery() as background:
            http, ops = worker.addresses["http"], worker.addresses["metrics"]
            stop_slowloris = trio.Event()
            for _ in range(load.slowloris):
                background.start_soon(slowloris, http, stop_slowloris)
            report["stage"] = "round 1"
            ledger = ExchangeLedger()
            streams, exchanges = await drive(http, load, tally, rng, trio.Event(), ledger)
            sent = collections.Counter(streams=streams, exchanges=exchanges)
            report["inflight_after_round1"], report["disconnects_counted"] = await inflight_from_metrics(
                ops, patience=SETTLE
            )
            if report["inflight_after_round1"] != 0:
                tally.violations.append(f"in-flight is {report['inflight_after_round1']} after round 1")
            if tally.cut_count() and not report["disconnects_counted"]:
                tally.violations.append("streams and exchanges were cut but the worker counted no disconnect")
            report["exchange_messages_round1"] = await check_exchange_counters(ops, ledger, tally)
            await check_engine_idle(ops, tally)
            report["stage"] = "round 2"
            tally.start_round(load.per_round // 4)
            routed_away, ledger = trio.Event(), ExchangeLedger(drain_begun=trio.Event())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load_balancer, ops, routed_away)

                async def round_two() -> None:
                    streams, exchanges = await drive(http, load, tally, rng, routed_away, ledger)
                    sent.update(streams=streams, exchanges=exchanges)

                nursery.start_soon(round_two)
                await tally.started_enough.wait()
                worker.send_signal(signal.SIGTERM)
                await worker.wait_event("shutdown.phase0.done")  # the drain begins
                ledger.drain_begun.set()
            report["exchanges_through_drain"] = ledger.through_drain
            report["stage"] = "waiting for the worker to exit"
            report["exit_code"] = await worker.wait_exit()
            stop_slowloris.set()
            del report["stage"]
    if report["exit_code"] != 0:
        tally.violations.append(f"worker exited {report['exit_code']}, not 0")
    name = "chaos_http (auth+TLS)" if WIRE.secure else "chaos_http"
    return tally.report(name, sent["streams"], report, exchanges=sent["exchanges"])


async def main(short: bool, seed: int, secure: bool) -> int:
    load = Load(24, 8, 8, 4, 0.3, 2) if short else Load(160, 48, 48, 16, 0.3, 8)
    tally, report = Tally(), {"stage": "starting"}
    with secured() if secure else contextlib.nullcontext() as security:
        WIRE.secure = security
        try:
            return await run(load, tally, report, random.Random(seed))
        except trio.TooSlowError:
            print(f"chaos_http: HUNG at stage {report['stage']}: {dict(tally.outcomes)}")
            return 1


if __name__ == "__main__":
    run_cli(__doc__, main, secure=True)
