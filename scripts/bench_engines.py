"""Engines that are not Trio code: the mocker served through the asyncio bridge (runtime.mocker:aio_worker)
and from a thread (thread_worker), side by side with the Trio mocker (worker) in one run, over TCP.

    python scripts/bench_engines.py            # about three minutes
    python scripts/bench_engines.py --quick    # smaller sizes, a smoke test

Workloads: 1 stream, and 256 concurrent streams (one connection each), of tokens as fast as the engine
makes them (itl 0: the bridge's own cost) and, for 256 streams, 20 ms apart (a decode step's pace). For
each: tokens/s and the worker's CPU time per token (from /proc, Linux only), median of three rounds with
the workers alternated; ratios are bridge / Trio (tokens/s: higher is better; CPU: lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import trio
from bench_nats import cpu_seconds
from bench_tcp import IngressConnection

from runtime.testing import WorkerProcess, worker_process

# The whole script stops by itself after this long, whatever happens.
RUN_TIMEOUT = 900.0
APPS = {
    "trio": "runtime.mocker:worker",
    "asyncio": "runtime.mocker:aio_worker",
    "thread": "runtime.mocker:thread_worker",
}


@dataclass(frozen=True)
class Load:
    label: str
    streams: int
    tokens: int
    itl_ms: int


FULL = (
    Load("1 stream, itl 0", 1, 50_000, 0),
    Load("256 streams, itl 0", 256, 400, 0),
    Load("256 streams, itl 20 ms", 256, 50, 20),
)
QUICK = (
    Load("1 stream, itl 0", 1, 5_000, 0),
    Load("256 streams, itl 0", 256, 40, 0),
    Load("256 streams, itl 20 ms", 256, 10, 20),
)


def progress(message: str) -> None:
    print(f"bench_engines: {message}", file=sys.stderr, flush=True)


async def measure(worker: WorkerProcess, load: Load) -> tuple[float, float]:
    """(tokens/s, worker CPU us per token) for ``load`` against ``worker``."""
    connections = [await IngressConnection.open(worker.addresses["tcp"]) for _ in range(load.streams)]
    counts: list[int] = []
    body = {"max_tokens": load.tokens, "itl_ms": load.itl_ms}

    async def one(conn: IngressConnection) -> None:
        counts.append(await conn.run("generate", body))

    cpu_before = cpu_seconds(worker.pid)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for conn in connections:
            nursery.start_soon(one, conn)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(worker.pid) - cpu_before
    for conn in connections:
        await conn.aclose()
    assert counts == [load.tokens] * load.streams, "a stream came back short"
    total = load.streams * load.tokens
    return total / elapsed, cpu / total * 1e6


async def main(loads: tuple[Load, ...]) -> None:
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    args = ("--tcp", "127.0.0.1:0", "--no-access-log")  # info: the worker.ready line is awaited
    with trio.fail_after(RUN_TIMEOUT):
        for round_ in range(3):
            for kind, app in APPS.items():
                progress(f"round {round_ + 1}, {kind}")
                async with worker_process(app, *args) as worker:
                    for load in loads:
                        results.setdefault((kind, load.label), []).append(await measure(worker, load))
    header = f"{'workload':32} {'trio':>10} {'asyncio':>10} {'thread':>10}"
    print(f"{header}  ratios vs trio (goal: asyncio >= 0.8x)")
    for load in loads:
        rate = {kind: statistics.median(r for r, _ in results[kind, load.label]) for kind in APPS}
        cpu = {kind: statistics.median(c for _, c in results[kind, load.label]) for kind in APPS}
        _row(f"tokens/s, {load.label}", rate, "{:10.0f}", "")
        _row(f"CPU us/token, {load.label}", cpu, "{:10.1f}", " (lower is better)")


def _row(label: str, values: dict[str, float], number: str, note: str) -> None:
    cells = " ".join(number.format(values[kind]) for kind in APPS)
    ratios = ", ".join(f"{values[kind] / values['trio']:.2f}x {kind}" for kind in APPS if kind != "trio")
    print(f"{label:32} {cells}  {ratios}{note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke test")
    options = parser.parse_args()
    trio.run(main, QUICK if options.quick else FULL)
