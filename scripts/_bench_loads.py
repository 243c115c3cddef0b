"""The loads an inference fleet runs (issue 11), shared by scripts/bench_tcp.py and scripts/bench_http.py:
a sweep of concurrent streams (one per connection) at each inter-token gap, printing tokens/s and the
server's CPU per token, and the first-chunk latency of new streams while the server is saturated. Each
measured side by side with a baseline server in the same run; the ratios are what to read.

A side is a server process, the address to reach it at, and how to open a connection to it: an object
whose ``run(endpoint, body, on_first)`` runs one request to its end and returns how many chunks came
(calling ``on_first()`` at the first), and whose ``aclose()`` closes it.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from runtime.testing import WorkerProcess


class Connection(Protocol):
    async def run(
        self, endpoint: str, body: dict[str, Any], on_first: Callable[[], None] | None = None
    ) -> int: ...

    async def aclose(self) -> None: ...


Opener = Callable[[tuple[str, int]], Awaitable[Connection]]


@dataclass(frozen=True)
class Side:
    opener: Opener
    server: WorkerProcess
    address: tuple[str, int]


@dataclass(frozen=True)
class LoadSizes:
    # Concurrent streams (one per connection) of ``tokens`` tokens, at each inter-token gap; and
    # first-chunk latency with ``saturating_streams`` always running, over ``saturation_seconds``.
    streams: tuple[int, ...] = (1, 16, 256, 1024)
    gaps_ms: tuple[int, ...] = (0, 20)
    tokens: int = 100
    saturating_streams: int = 256
    saturation_seconds: float = 5.0


Row = tuple[str, float, float, str]


async def timed_concurrently(
    opener: Opener, address: tuple[str, int], count: int, work: Callable[[Any], Awaitable[None]]
) -> float:
    """Open ``count`` connections, run ``work`` on all of them at once; the seconds that took."""
    connections = [await opener(address) for _ in range(count)]
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for conn in connections:
            nursery.start_soon(work, conn)
    elapsed = time.perf_counter() - start
    for conn in connections:
        await conn.aclose()
    return elapsed


async def streamed_tokens_per_second(
    opener: Opener, address: tuple[str, int], streams: int, tokens: int, itl_ms: int = 0
) -> float:
    counts: list[int] = []

    async def one(conn: Connection) -> None:
        counts.append(await conn.run("generate", {"max_tokens": tokens, "itl_ms": itl_ms}))

    elapsed = await timed_concurrently(opener, address, streams, one)
    assert counts == [tokens] * streams, "a stream came back short"
    return streams * tokens / elapsed


def rss_bytes(pid: int) -> int:
    """The process's resident memory now (/proc/PID/status, VmRSS)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU the process has used so far (/proc/PID/stat, fields 14 and 15)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def tokens_and_cpu(side: Side, streams: int, tokens: int, itl_ms: int) -> tuple[float, float]:
    """Tokens per second for ``streams`` concurrent streams (one per connection), and the server's CPU
    microseconds per token over the same run."""
    before = cpu_seconds(side.server.pid)
    rate = await streamed_tokens_per_second(side.opener, side.address, streams, tokens, itl_ms)
    used = cpu_seconds(side.server.pid) - before
    return rate, used / (streams * tokens) * 1e6


async def first_chunk_latencies(
    side: Side, streams: int, tokens: int, seconds: float, itl_ms: int = 0
) -> list[float]:
    """Keep ``streams`` streams of ``tokens`` tokens (``itl_ms`` apart) running back to back (one
    connection each, enough of them to saturate the server, CPU-bound), and time each new stream's
    first chunk, after a warm-up."""
    connections = [await side.opener(side.address) for _ in range(streams)]
    latencies: list[float] = []
    warm_until = time.perf_counter() + seconds / 5
    with trio.move_on_after(seconds + seconds / 5):
        async with trio.open_nursery() as nursery:
            for conn in connections:

                async def loop(conn: Connection = conn) -> None:
                    while True:
                        sent = time.perf_counter()

                        def first(sent: float = sent) -> None:
                            if sent >= warm_until:
                                latencies.append(time.perf_counter() - sent)

                        await conn.run("generate", {"max_tokens": tokens, "itl_ms": itl_ms}, first)

                nursery.start_soon(loop)
    for conn in connections:
        await conn.aclose()
    return latencies


async def inference_loads(ours: Side, baseline: Side, sizes: LoadSizes, tag: str) -> list[Row]:
    """The sweep (tokens/s and CPU per token, each the median of three rounds alternating the two
    servers), then first-chunk p50 and p99 with the server saturated (one run each). ``tag`` names the
    protocol in the row labels and the progress lines."""
    rows: list[Row] = []
    busiest = (max(sizes.streams), max(sizes.gaps_ms))  # the goal is set there
    for gap in sizes.gaps_ms:
        for streams in sizes.streams:
            label = f"{streams} streams x {sizes.tokens} tokens, {gap} ms apart{tag}"
            progress(f"sweep: {label}")
            rates: list[list[float]] = [[], []]
            cpus: list[list[float]] = [[], []]
            for _ in range(3):
                for index, side in enumerate((ours, baseline)):
                    rate, cpu = await tokens_and_cpu(side, streams, sizes.tokens, gap)
                    rates[index].append(rate)
                    cpus[index].append(cpu)
            goal = (streams, gap) == busiest
            rate_ours, rate_base = statistics.median(rates[0]), statistics.median(rates[1])
            cpu_ours, cpu_base = statistics.median(cpus[0]), statistics.median(cpus[1])
            rows.append((f"tokens/s, {label}", rate_ours, rate_base, ">= 1.0x" if goal else ""))
            rows.append(
                (
                    f"server CPU us/token, {label}",
                    cpu_ours,
                    cpu_base,
                    "<= 1.0x" if goal else "(lower is better)",
                )
            )
    streams = sizes.saturating_streams
    progress(f"first chunk, {streams} streams saturating the server{tag}")
    latencies = [
        await first_chunk_latencies(side, streams, sizes.tokens, sizes.saturation_seconds)
        for side in (ours, baseline)
    ]
    for name, q in (("p50", 50), ("p99", 99)):
        ours_q, base_q = (statistics.quantiles(values, n=100)[q - 1] * 1000 for values in latencies)
        rows.append((f"first chunk {name} ms, {streams} streams saturated{tag}", ours_q, base_q, "<= 2.0x"))
    return rows


def progress(message: str) -> None:
    print(f"{pathlib.Path(sys.argv[0]).stem}: {message}", file=sys.stderr, flush=True)
