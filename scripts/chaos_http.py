"""Chaos for the HTTP transport: cut HTTP/1.1 and HTTP/2 streams, slowloris, SIGTERM under load.

Runs a real worker process (the mocker, HTTP only) on 127.0.0.1 and drives it in two rounds, like
scripts/chaos_tcp.py:

1. SSE streams over HTTP/1.1 (raw sockets) and HTTP/2 (the h2 library); a share of the connections is cut
   mid-stream: HTTP/1.1 half with a clean close, half with a reset (SO_LINGER 0); HTTP/2 by closing the
   connection. A few slowloris connections dribble a request head the whole time. Afterwards /metrics must
   show in-flight back at 0 and disconnects counted.
2. A rolling restart: the same load with SIGTERM once a share of the streams is running, the worker
   started with ``--shutdown-delay``, and a load-balancer task polling /ready that stops routing new
   streams once it reads 503 (as Kubernetes does). Streams routed before that must complete (or get an
   explicit error); the worker must exit 0. (A request that reaches a worker in the instant it exits can
   get no answer from any server; readiness plus shutdown_delay is what keeps traffic out of that
   instant, and that is what this round checks. The 503 answer to callers that ignore readiness is
   covered by tests/test_http.py.)

Every stream ends completed (all tokens, then the end event), with an explicit error, or cut by this
script; anything else (a stream that stops without an end or error event, a hang) is a violation.

    python scripts/chaos_http.py            # full run
    python scripts/chaos_http.py --short    # CI run
"""

from __future__ import annotations

import json
import random
import signal
import socket
import struct
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import httpx
import trio
from _chaos import Tally, check_engine_idle, inflight_from_metrics, run_cli

from runtime.testing import worker_process

STREAM_TIMEOUT = 60.0  # a stream still open this long after it started is a hang: a violation
RUN_TIMEOUT = 180.0  # the whole script stops by itself after this long
SLOWLORIS_BYTE_INTERVAL = 0.05
# The load balancer's readiness probe period, well inside the worker's shutdown delay below.
LB_PROBE_INTERVAL = 0.05
SHUTDOWN_DELAY = "0.5"


@dataclass(frozen=True)
class Load:
    h1_streams: int
    h2_streams: int
    cut_share: float
    slowloris: int


def _request(max_tokens: int) -> bytes:
    body = json.dumps({"max_tokens": max_tokens, "itl_ms": 2}).encode()
    head = f"POST /v1/generate HTTP/1.1\r\nhost: chaos\r\ncontent-length: {len(body)}\r\n\r\n"
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
        stream = await trio.open_tcp_stream(*address)
    except OSError:
        tally.outcomes["error:REFUSED"] += 1  # the listener is closed: explicit, safe to retry
        return
    async with stream:
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


async def _receive(stream: trio.SocketStream) -> bytes | None:
    try:
        data = await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return None
    return data or None


def _cut(stream: trio.SocketStream, how: str | None) -> None:
    if how == "reset":
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def h2_stream(address: tuple[str, int], tally: Tally, rng: random.Random, cut: bool) -> None:
    """One stream per HTTP/2 connection, so cutting the connection cuts exactly that stream."""
    max_tokens = rng.randint(20, 200)
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError:
        tally.outcomes["error:REFUSED"] += 1
        return
    async with stream:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "POST"),
            (":path", "/v1/generate"),
            (":scheme", "http"),
            (":authority", "chaos"),
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
                    stream.socket.close()
                    tally.outcomes["cut:h2-close"] += 1
                    return
                await stream.send_all(conn.data_to_send())
    if timer.cancelled_caught:
        tally.violations.append("HTTP/2 stream hung")
    elif outcome in (None, "violation"):
        tally.violations.append(f"HTTP/2 stream ended without an end or error event (status {status})")
    else:
        tally.outcomes[outcome] += 1


async def slowloris(address: tuple[str, int], stop: trio.Event) -> None:
    """Dribble a request head one byte at a time until told to stop (or the worker closes on us)."""
    head = b"POST /v1/echo HTTP/1.1\r\nhost: chaos\r\nx-padding: " + b"a" * 10_000
    try:
        async with await trio.open_tcp_stream(*address) as stream:
            for byte in head:
                if stop.is_set():
                    return
                await stream.send_all(bytes([byte]))
                await trio.sleep(SLOWLORIS_BYTE_INTERVAL)
    except (OSError, trio.BrokenResourceError):
        return


async def drive(
    address: tuple[str, int], load: Load, tally: Tally, rng: random.Random, routed_away: trio.Event
) -> int:
    """Start the round's streams, staggered, until the load balancer routes away; returns how many."""
    started = 0
    async with trio.open_nursery() as nursery:
        for i in range(load.h1_streams + load.h2_streams):
            if routed_away.is_set():
                break
            if i < load.h1_streams:
                cut = ("close" if i % 2 else "reset") if rng.random() < load.cut_share else None
                nursery.start_soon(h1_stream, address, tally, rng, cut)
            else:
                nursery.start_soon(h2_stream, address, tally, rng, rng.random() < load.cut_share)
            started += 1
            await trio.sleep(rng.random() * 0.01)
    return started


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
    per_round = load.h1_streams + load.h2_streams
    with trio.fail_after(RUN_TIMEOUT):
        args = (
            "--http",
            "127.0.0.1:0",
            "--no-access-log",
            "--drain-timeout",
            "30",
            "--shutdown-delay",
            SHUTDOWN_DELAY,
        )
        async with worker_process(*args) as worker, trio.open_nursery() as background:
            http = worker.addresses["http"]
            stop_slowloris = trio.Event()
            for _ in range(load.slowloris):
                background.start_soon(slowloris, http, stop_slowloris)
            report["stage"] = "round 1"
            sent = await drive(http, load, tally, rng, trio.Event())
            report["inflight_after_round1"], report["disconnects_counted"] = await inflight_from_metrics(http)
            if report["inflight_after_round1"] != 0:
                tally.violations.append(f"in-flight is {report['inflight_after_round1']} after round 1")
            if tally.cut_count() and not report["disconnects_counted"]:
                tally.violations.append("streams were cut but the worker counted no disconnect")
            await check_engine_idle(http, tally)
            report["stage"] = "round 2"
            tally.start_round(per_round // 4)
            routed_away = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load_balancer, http, routed_away)

                async def round_two() -> None:
                    nonlocal sent
                    sent += await drive(http, load, tally, rng, routed_away)

                nursery.start_soon(round_two)
                await tally.started_enough.wait()
                worker.send_signal(signal.SIGTERM)
            report["stage"] = "waiting for the worker to exit"
            report["exit_code"] = await worker.wait_exit()
            stop_slowloris.set()
            del report["stage"]
    if report["exit_code"] != 0:
        tally.violations.append(f"worker exited {report['exit_code']}, not 0")
    return tally.report("chaos_http", sent, report)


async def main(short: bool, seed: int) -> int:
    load = Load(24, 8, 0.3, 2) if short else Load(160, 48, 0.3, 8)
    tally, report = Tally(), {"stage": "starting"}
    try:
        return await run(load, tally, report, random.Random(seed))
    except trio.TooSlowError:
        print(f"chaos_http: HUNG at stage {report['stage']}: {dict(tally.outcomes)}")
        return 1


if __name__ == "__main__":
    run_cli(__doc__, main)
