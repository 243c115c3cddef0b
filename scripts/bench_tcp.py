"""Benchmark: the TCP transport against a minimal raw Trio server doing the same work, in one run.

This process is only the load generator; both servers run as their own processes on 127.0.0.1 (the
mocker under ``ingress serve``, and scripts/bench_raw_server.py). Each throughput figure is the median of
three rounds, alternating the two servers so that noise on this shared machine hits both alike; the
ratios are what to read. Clients on both sides are equally thin (they count frames, decode nothing).

    python scripts/bench_tcp.py            # full run (about a minute)
    python scripts/bench_tcp.py --quick    # smaller sizes, for a smoke test
    python scripts/bench_tcp.py --secure   # our worker with --auth-tokens and TLS (the baseline without)

Goals (from the issue): streaming >= 1.0x the raw server, round trips >= 0.8x, disconnect p99 <= 5 ms,
idle SIGTERM-to-exit < 0.5 s.

The loads an inference fleet runs (issue 11): a sweep of 1 to 1,024 concurrent streams (one per
connection) of 100 tokens, with 0 and 20 ms between tokens, printing tokens/s and the server's CPU per
token (from /proc) for each; and the first-chunk latency (p50, p99) of new streams while 256 streams
keep the server saturated. Goals: at 1,024 streams 20 ms apart, >= 1.0x the raw server's tokens/s with
CPU per token <= the raw server's; first chunk <= 2x the raw server's at p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import statistics
import struct
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime

import trio
from _bench_loads import (
    LoadSizes,
    Opener,
    Side,
    inference_loads,
    progress,
    rss_bytes,
    streamed_tokens_per_second,
    timed_concurrently,
)
from _secure import Secure, secured

from runtime.testing import WorkerProcess, spawn_process, worker_process
from transports.tcp import _protocol as codec

RAW_SERVER = [sys.executable, str(pathlib.Path(__file__).with_name("bench_raw_server.py")), "0"]
_U32 = struct.Struct("!I")
# The whole benchmark stops by itself after this long.
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Sizes:
    one_stream_tokens: int
    many_streams: int
    many_stream_tokens: int
    echo_connections: int
    echo_calls: int
    idle_connections: int
    disconnect_samples: int
    loads: LoadSizes = field(default_factory=LoadSizes)


FULL = Sizes(200_000, 16, 25_000, 32, 1_000, 500, 200)
QUICK = Sizes(20_000, 16, 2_000, 32, 100, 100, 40, LoadSizes((1, 64), (0, 20), 20, 64, 1.0))


# --secure: the run's certificate and token (scripts/_secure.py); our worker serves with both on, the
# raw baseline stays cleartext, so the ratios then include what security costs.
SECURE: Secure | None = None


class IngressConnection:
    """A thin client of our protocol: one stream at a time, frames counted, nothing decoded."""

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.next_id = 1
        self.client = codec.Connection(codec.Role.CLIENT)
        self.metadata = (("authorization", f"Bearer {SECURE.token}"),) if SECURE else ()

    @classmethod
    async def open(cls, address: tuple[str, int]) -> IngressConnection:
        raw = await trio.open_tcp_stream(*address)
        conn = cls(trio.SSLStream(raw, SECURE.tls, server_hostname=address[0]) if SECURE else raw)
        await conn.stream.send_all(conn.client.send(conn.client.local_hello))
        await read_at_least(conn.stream, conn.buffer, len(codec.MAGIC) + codec.HEADER.size + 10)
        del conn.buffer[: len(codec.MAGIC) + codec.HEADER.size + 10]
        conn.client.peer_hello = conn.client.local_hello
        return conn

    async def run(self, endpoint: str, body: dict, on_first: Callable[[], None] | None = None) -> int:
        stream_id, self.next_id = self.next_id, self.next_id + 1
        request = codec.Request(stream_id, endpoint, "", 0, self.metadata, json.dumps(body).encode())
        await self.stream.send_all(self.client.send(request))
        chunks = taken = 0
        while True:
            await read_at_least(self.stream, self.buffer, 9)
            length, frame_type, _ = codec.HEADER.unpack_from(self.buffer)
            await read_at_least(self.stream, self.buffer, 9 + length)
            del self.buffer[: 9 + length]
            if frame_type == codec.FrameType.DATA:
                if not chunks and on_first is not None:
                    on_first()
                chunks += 1
                taken += length
                if taken * 2 >= self.client.answer_window:  # return answer credit, as TcpClient does
                    update = codec.HEADER.pack(4, codec.FrameType.WINDOW_UPDATE, stream_id)
                    await self.stream.send_all(update + _U32.pack(taken))
                    taken = 0
            elif frame_type == codec.FrameType.END:
                return chunks
            elif frame_type == codec.FrameType.ERROR:
                raise RuntimeError("the worker answered with an error")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class RawConnection:
    """A thin client of the raw baseline protocol (u32 length + JSON frames; an empty frame ends)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, address: tuple[str, int]) -> RawConnection:
        return cls(await trio.open_tcp_stream(*address))

    async def run(self, endpoint: str, body: dict, on_first: Callable[[], None] | None = None) -> int:
        request = {"op": endpoint, "body": body, **(body if endpoint == "generate" else {})}
        payload = json.dumps(request).encode()
        await self.stream.send_all(_U32.pack(len(payload)) + payload)
        chunks = 0
        while True:
            await read_at_least(self.stream, self.buffer, 4)
            (length,) = _U32.unpack_from(self.buffer)
            await read_at_least(self.stream, self.buffer, 4 + length)
            del self.buffer[: 4 + length]
            if endpoint == "echo":
                return 1
            if length == 0:
                return chunks
            if not chunks and on_first is not None:
                on_first()
            chunks += 1

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def read_at_least(
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream], buffer: bytearray, size: int
) -> None:
    """Fill ``buffer`` to ``size`` bytes; EOFError if the server closes first (so nothing spins)."""
    while len(buffer) < size:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        buffer += data


Connection = IngressConnection | RawConnection


async def echo_round_trips_per_second(
    open_conn: Opener, address: tuple[str, int], conns: int, calls: int
) -> float:
    async def one(conn: Connection) -> None:
        for i in range(calls):
            await conn.run("echo", {"i": i})

    return conns * calls / await timed_concurrently(open_conn, address, conns, one)


async def bytes_per_idle_connection(open_conn: Opener, server: WorkerProcess, count: int) -> float:
    address = server.addresses["tcp"]
    warm = await open_conn(address)  # first-use allocations are not per-connection cost
    await warm.run("echo", {})
    before = rss_bytes(server.pid)
    conns = [await open_conn(address) for _ in range(count)]
    for conn in conns:
        await conn.run("echo", {})  # proves the server has accepted and set it up; then it idles
    after = rss_bytes(server.pid)
    for conn in [warm, *conns]:
        await conn.aclose()
    return (after - before) / count


async def disconnect_latencies(
    open_conn: Opener, server: WorkerProcess, samples: int, event: str
) -> list[float]:
    """Wall time from the client closing mid-stream to the server's record of the handler cancelled."""
    latencies = []
    for n in range(1, samples + 1):
        conn = await open_conn(server.addresses["tcp"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run, "generate", {"max_tokens": 1_000_000, "itl_ms": 5})
            await trio.sleep(0.02)  # a few chunks in: the handler is mid-stream
            nursery.cancel_scope.cancel()
        closed_at = time.time()
        await conn.aclose()
        record = await server.wait_event(event, nth=n)
        latencies.append(_wall_time(record["timestamp"]) - closed_at)
    return latencies


def _wall_time(stamp: float | str) -> float:
    return stamp if isinstance(stamp, float) else datetime.fromisoformat(stamp).timestamp()


async def sigterm_to_exit(
    start: Callable[[], AbstractAsyncContextManager[WorkerProcess]], open_conn: Opener, streams: int
) -> tuple[float, int]:
    """Seconds from SIGTERM to exit, and how many of ``streams`` in-flight streams completed."""
    async with start() as server:
        completed = 0
        conns = [await open_conn(server.addresses["tcp"]) for _ in range(streams)]

        async def one(conn: Connection) -> None:
            nonlocal completed
            try:
                if await conn.run("generate", {"max_tokens": 50, "itl_ms": 10}) == 50:
                    completed += 1
            except (trio.BrokenResourceError, RuntimeError, OSError, EOFError):
                pass  # cut by the server's exit: counted as not completed

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(one, conn)
            await trio.sleep(0.1)
            sent = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            await server.wait_exit()
            exited = time.perf_counter() - sent
        for conn in conns:
            await conn.aclose()
    return exited, completed


async def main(sizes: Sizes, secure: bool) -> None:
    with secured() if secure else nullcontext() as security:
        global SECURE
        SECURE = security
        await _measure(sizes, security.serve_args if security else ())


async def _measure(sizes: Sizes, security_args: tuple[str, ...]) -> None:
    ours_args = ("--tcp", "127.0.0.1:0", "--no-access-log", *security_args)
    rows: list[tuple[str, float, float, str]] = []
    with trio.fail_after(RUN_TIMEOUT):
        async with worker_process(*ours_args) as ours, spawn_process(RAW_SERVER) as raw:
            pairs = [(IngressConnection.open, ours), (RawConnection.open, raw)]
            for label, measure, goal in [
                (
                    "stream tokens/s, 1 stream",
                    lambda o, s: streamed_tokens_per_second(
                        o, s.addresses["tcp"], 1, sizes.one_stream_tokens
                    ),
                    ">= 1.0x",
                ),
                (
                    f"stream tokens/s, {sizes.many_streams} streams",
                    lambda o, s: streamed_tokens_per_second(
                        o, s.addresses["tcp"], sizes.many_streams, sizes.many_stream_tokens
                    ),
                    ">= 1.0x",
                ),
                (
                    f"echo round trips/s, {sizes.echo_connections} conns",
                    lambda o, s: echo_round_trips_per_second(
                        o, s.addresses["tcp"], sizes.echo_connections, sizes.echo_calls
                    ),
                    ">= 0.8x",
                ),
            ]:
                progress(label)
                results: dict[int, list[float]] = {0: [], 1: []}
                for _ in range(3):
                    for side, (opener, server) in enumerate(pairs):
                        results[side].append(await measure(opener, server))
                rows.append((label, statistics.median(results[0]), statistics.median(results[1]), goal))
            rows += await inference_loads(
                Side(IngressConnection.open, ours, ours.addresses["tcp"]),
                Side(RawConnection.open, raw, raw.addresses["tcp"]),
                sizes.loads,
                tag="",
            )
        async with (
            worker_process("--tcp", "127.0.0.1:0", "--log-level", "info", *security_args) as ours,
            spawn_process(RAW_SERVER) as raw,
        ):
            progress("disconnect latency")
            ours_lat = await disconnect_latencies(
                IngressConnection.open, ours, sizes.disconnect_samples, "request"
            )
            raw_lat = await disconnect_latencies(
                RawConnection.open, raw, sizes.disconnect_samples, "cancelled"
            )
        for name, q in (("p50", 50), ("p99", 99)):
            ours_q = statistics.quantiles(ours_lat, n=100)[q - 1] * 1000
            raw_q = statistics.quantiles(raw_lat, n=100)[q - 1] * 1000
            rows.append(
                (
                    f"disconnect -> handler cancelled {name} ms",
                    ours_q,
                    raw_q,
                    "p99 <= 5 ms" if q == 99 else "",
                )
            )
        progress("idle connections")
        # Each side in a process of its own that has served nothing else: memory freed by earlier
        # loads would be reused by the new connections and hide what they cost.
        async with worker_process(*ours_args) as fresh_ours, spawn_process(RAW_SERVER) as fresh_raw:
            ours_idle = await bytes_per_idle_connection(
                IngressConnection.open, fresh_ours, sizes.idle_connections
            )
            raw_idle = await bytes_per_idle_connection(RawConnection.open, fresh_raw, sizes.idle_connections)
        rows.append(("bytes per idle connection", ours_idle, raw_idle, "<= 1.5x"))
        progress("SIGTERM to exit")
        ours_idle_exit, _ = await sigterm_to_exit(
            lambda: worker_process(*ours_args), IngressConnection.open, 0
        )
        raw_idle_exit, _ = await sigterm_to_exit(lambda: spawn_process(RAW_SERVER), RawConnection.open, 0)
        rows.append(("SIGTERM -> exit, idle, ms", ours_idle_exit * 1000, raw_idle_exit * 1000, "< 500 ms"))
        ours_busy_exit, ours_done = await sigterm_to_exit(
            lambda: worker_process(*ours_args), IngressConnection.open, 16
        )
        raw_busy_exit, raw_done = await sigterm_to_exit(
            lambda: spawn_process(RAW_SERVER), RawConnection.open, 16
        )
        rows.append(
            (
                f"SIGTERM -> exit, 16 streams, ms (completed {ours_done}/16 vs {raw_done}/16)",
                ours_busy_exit * 1000,
                raw_busy_exit * 1000,
                "all complete",
            )
        )
    ours_name = "ingress+sec" if security_args else "ingress"
    print(f"{'metric':66} {ours_name:>12} {'raw trio':>12} {'ratio':>7}  goal")
    for label, ours_value, raw_value, goal in rows:
        ratio = ours_value / raw_value if raw_value else float("nan")
        print(f"{label:66} {ours_value:12.1f} {raw_value:12.1f} {ratio:6.2f}x  {goal}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="our worker with --auth-tokens and TLS on (the baseline without)",
    )
    options = parser.parse_args()
    trio.run(main, QUICK if options.quick else FULL, options.secure)
