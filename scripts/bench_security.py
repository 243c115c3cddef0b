"""What authentication and TLS cost (docs/performance.md "Security"): the same mocker worker four times,
side by side in one run (plain, --auth-tokens, TLS, both), measured in alternating rounds.

Loads (the project's own clients, one request at a time per connection):
- TCP unary: echo calls per second over 32 connections (the per-request cost: the auth check is paid
  once per request, TLS once per frame);
- TCP streaming: tokens per second, 16 streams of 2,000 tokens (the per-chunk cost: auth is paid once
  per stream, TLS on every chunk);
- HTTP/1.1 unary: echo calls per second, 16 keep-alive connections (httpx), with the worker's CPU per
  request;
and the connection set-up: new connections per second, each doing one call (the TLS handshake's cost).

Each number is the median of the rounds; the ratio is against the plain worker of the same run.

    python scripts/bench_security.py            # 3 rounds
    python scripts/bench_security.py --quick    # 1 round, smaller loads
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from _bench_loads import cpu_seconds, progress
from _secure import Secure, secured

from runtime.testing import WorkerProcess, worker_process
from transports.tcp import TcpClient

CONFIGS = ("plain", "auth", "tls", "auth+tls")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    calls: int  # per connection, unary loads
    tokens: int  # per stream
    handshakes: int  # new connections, one call each


@dataclass
class Target:
    name: str
    worker: WorkerProcess
    connect: dict[str, Any]  # TcpClient.connect options: tls, token
    http: dict[str, Any]  # httpx.AsyncClient options: base_url, verify, headers


@asynccontextmanager
async def targets(secure: Secure) -> AsyncIterator[list[Target]]:
    """The four workers."""
    plain = ("--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-access-log")
    args = {
        "plain": plain,
        "auth": (*plain, *secure.auth_args),
        "tls": (*plain, *secure.tls_args),
        "auth+tls": (*plain, *secure.serve_args),
    }
    async with AsyncExitStack() as stack:
        found = []
        for name in CONFIGS:
            worker = await stack.enter_async_context(worker_process(*args[name]))
            auth, tls = "auth" in name, "tls" in name
            scheme = "https" if tls else "http"
            found.append(
                Target(
                    name,
                    worker,
                    {"tls": secure.tls if tls else None, "token": secure.token if auth else None},
                    {
                        "base_url": "{}://{}:{}".format(scheme, *worker.addresses["http"]),
                        "verify": secure.tls if tls else True,
                        "headers": {"authorization": f"Bearer {secure.token}"} if auth else {},
                    },
                )
            )
        yield found


async def tcp_unary(target: Target, sizes: Sizes) -> float:
    async def one(client: TcpClient) -> None:
        for i in range(sizes.calls):
            await client.call("echo", {"i": i})

    return 32 * sizes.calls / await _on_connections(target, 32, one)


async def tcp_streaming(target: Target, sizes: Sizes) -> float:
    async def one(client: TcpClient) -> None:
        count = 0
        async for _ in client.stream("generate", {"max_tokens": sizes.tokens}):
            count += 1
        assert count == sizes.tokens

    return 16 * sizes.tokens / await _on_connections(target, 16, one)


async def tcp_handshakes(target: Target, sizes: Sizes) -> float:
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(_connect_and_call, target, sizes.handshakes // 8)
    return sizes.handshakes / (time.perf_counter() - start)


async def _connect_and_call(target: Target, count: int) -> None:
    for _ in range(count):
        async with TcpClient.connect(*target.worker.addresses["tcp"], **target.connect) as client:
            await client.call("echo", {})


async def _on_connections(target: Target, count: int, work: Callable[[TcpClient], Awaitable[None]]) -> float:
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                TcpClient.connect(*target.worker.addresses["tcp"], **target.connect)
            )
            for _ in range(count)
        ]
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(work, client)
        return time.perf_counter() - start


async def http_unary(target: Target, sizes: Sizes) -> tuple[float, float]:
    """Calls per second, and the worker's CPU microseconds per call."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(**target.http)) for _ in range(16)]

        async def one(client: httpx.AsyncClient) -> None:
            for i in range(sizes.calls):
                answer = await client.post("/v1/echo", json={"i": i})
                assert answer.status_code == 200, answer.text

        before, start = cpu_seconds(target.worker.process.pid), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(one, client)
        elapsed = time.perf_counter() - start
        used = cpu_seconds(target.worker.process.pid) - before
    calls = 16 * sizes.calls
    return calls / elapsed, used / calls * 1e6


async def main(sizes: Sizes) -> None:
    results: dict[tuple[str, str], list[float]] = {}
    with secured() as secure:
        async with targets(secure) as found:
            warm_up = Sizes(1, 20, 100, 8)  # imports, caches and TLS session set-up, before any number
            for target in found:
                await http_unary(target, warm_up)
                await tcp_unary(target, warm_up)
            for round_number in range(sizes.rounds):
                order = found if round_number % 2 == 0 else list(reversed(found))
                for target in order:
                    progress(f"round {round_number + 1}: {target.name}")
                    rate, cpu = await http_unary(target, sizes)
                    for load, value in (
                        ("TCP unary calls/s", await tcp_unary(target, sizes)),
                        ("TCP streamed tokens/s", await tcp_streaming(target, sizes)),
                        ("TCP new connections/s (one call each)", await tcp_handshakes(target, sizes)),
                        ("HTTP/1.1 unary calls/s", rate),
                        ("HTTP/1.1 worker CPU us/call", cpu),
                    ):
                        results.setdefault((load, target.name), []).append(value)
    loads = list(dict.fromkeys(load for load, _ in results))
    print(f"{'load':<40}" + "".join(f"{name:>20}" for name in CONFIGS))
    for load in loads:
        base = statistics.median(results[(load, "plain")])
        cells = []
        for name in CONFIGS:
            value = statistics.median(results[(load, name)])
            cells.append(f"{value:>10.0f} ({value / base:.2f}x)" if name != "plain" else f"{value:>20.0f}")
        print(f"{load:<40}" + "".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round, smaller loads")
    quick = parser.parse_args().quick
    sys.exit(trio.run(main, Sizes(1, 100, 500, 64) if quick else Sizes(3, 300, 2000, 256)))
