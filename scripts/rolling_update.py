"""A rolling update and a scale-in, proven with processes (docs/operations.md "Rolling updates, proven").

Worker processes (the mocker, with a simulated model load) serve a continuous streaming load: callers
stream ``generate`` back to back, each checking every token in order. Then, while the load goes on:

- ``tcp``: the workers sit behind ``TcpPool`` and are replaced one by one the way a Deployment with
  maxSurge 1 / maxUnavailable 0 does it: start the new one, wait until it is ready, give the pool its
  address (what discovery would), SIGTERM the old one, wait for its exit, take its address away.
- ``nats``: the same behind a NATS queue group (``NatsClient``): a new worker joins the queue group
  once ready; a draining one leaves it.
- ``scale``: four workers behind ``TcpPool`` are scaled in to one (three SIGTERMs at once, an HPA's
  scale-in), then out to four again.

For each mode it prints the requests, how many completed, were retried (by the client, before their
first chunk) and were lost (did not complete: an error reached the caller, a stream was cut short or
hung; must be 0), the time to first chunk p50/p99 before and during the change, and the old workers'
exit codes (must be 0). Exits 1 if anything was lost or a worker exited otherwise.

    python scripts/rolling_update.py                 # every mode, full size
    python scripts/rolling_update.py --short         # every mode, small (CI)
    python scripts/rolling_update.py --mode nats
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from runtime import IngressError, RetryBudget
from runtime.testing import WorkerProcess, start_nats_server, worker_process
from transports.nats import NatsClient
from transports.tcp import TcpPool

RUN_TIMEOUT = 240.0  # each mode stops by itself after this long
STREAM_TIMEOUT = 60.0  # a stream open this long is a hang: counted lost
MODEL_LOAD_S = "0.5"  # each new worker's simulated model load (INGRESS_MOCKER_LOAD_S)
WORKER_ARGS = ("--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--no-access-log", "--drain-timeout", "30")


@dataclass(frozen=True)
class Size:
    workers: int
    callers: int
    tokens: int
    itl_ms: int
    settle_s: float  # load before the change (the "before" sample) and after it


SIZES = {"full": Size(3, 32, 50, 10, 3.0), "short": Size(2, 8, 20, 10, 0.5)}


@dataclass
class Ledger:
    """Every request the callers made, by the phase it started in."""

    phase: str = "before"
    requests: int = 0
    completed: int = 0
    lost: Counter[str] = field(default_factory=Counter)
    first_chunk: dict[str, list[float]] = field(default_factory=dict)

    async def one(self, chunks: AsyncIterator[Any], tokens: int) -> None:
        phase, start = self.phase, trio.current_time()
        self.requests += 1
        received: list[int] = []
        try:
            with trio.fail_after(STREAM_TIMEOUT):
                async for chunk in chunks:
                    if not received:
                        self.first_chunk.setdefault(phase, []).append(trio.current_time() - start)
                    received.append(chunk["index"])
        except IngressError as error:
            self.lost[f"error:{error.code.name}"] += 1
            return
        except trio.TooSlowError:
            self.lost["hung"] += 1
            return
        if received == list(range(tokens)):
            self.completed += 1
        else:
            self.lost["cut short"] += 1

    def latency(self, phase: str) -> str:
        samples = self.first_chunk.get(phase, [])
        if len(samples) < 2:
            return "n/a"
        cuts = statistics.quantiles(samples, n=100)
        return f"{cuts[49] * 1000:.1f}/{cuts[98] * 1000:.1f}ms"


Stream = Callable[[], AsyncGenerator[Any, None]]


async def drive(stream: Stream, ledger: Ledger, size: Size, stop: trio.Event) -> None:
    """``size.callers`` callers, each streaming back to back until ``stop``."""

    async def caller() -> None:
        while not stop.is_set():
            chunks = stream()
            async with aclosing(chunks):
                await ledger.one(chunks, size.tokens)

    async with trio.open_nursery() as nursery:
        for _ in range(size.callers):
            nursery.start_soon(caller)


@asynccontextmanager
async def under_load(stream: Stream, ledger: Ledger, size: Size) -> AsyncIterator[None]:
    """Run the load for the block: ``settle_s`` of it before the block's change, and after."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive, stream, ledger, size, stop)
        await trio.sleep(size.settle_s)
        ledger.phase = "during"
        yield
        ledger.phase = "after"
        await trio.sleep(size.settle_s)
        stop.set()


class Fleet:
    """The worker processes of one mode, each held by a task of the fleet's nursery (so processes
    started while the load runs nest properly); ``start`` returns once the new one is ready."""

    def __init__(self, nursery: trio.Nursery, extra_args: tuple[str, ...]) -> None:
        self._nursery = nursery
        self._args = (*WORKER_ARGS, *extra_args)
        self.exit_codes: list[int] = []

    async def start(self) -> WorkerProcess:
        worker: WorkerProcess = await self._nursery.start(self._run)
        return worker

    async def start_many(self, count: int) -> list[WorkerProcess]:
        """``count`` new workers started at once (a Deployment's first pods, or a scale-out)."""
        workers: list[WorkerProcess] = []

        async def one() -> None:
            workers.append(await self.start())

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
        return workers

    async def _run(self, *, task_status: trio.TaskStatus[WorkerProcess]) -> None:
        env = {"INGRESS_MOCKER_LOAD_S": MODEL_LOAD_S}
        async with worker_process(*self._args, env=env) as worker:
            task_status.started(worker)
            await worker.wait_exit()

    async def stop(self, workers: list[WorkerProcess]) -> None:
        """SIGTERM them all at once and wait for every exit."""
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            self.exit_codes.append(await worker.wait_exit())


def tcp_address(worker: WorkerProcess) -> tuple[str, int]:
    return worker.addresses["tcp"]


async def rolling_tcp(size: Size) -> tuple[Ledger, list[int], RetryBudget]:
    ledger, budget = Ledger(), RetryBudget()
    async with trio.open_nursery() as processes, AsyncExitStack() as stack:
        fleet = Fleet(processes, ())
        workers = await fleet.start_many(size.workers)
        pool = await stack.enter_async_context(
            TcpPool.connect(map(tcp_address, workers), retry_budget=budget)
        )
        await pool.wait_usable(size.workers)
        request = {"max_tokens": size.tokens, "itl_ms": size.itl_ms}
        async with under_load(lambda: pool.stream("generate", request), ledger, size):
            for _ in range(size.workers):
                old, new = workers.pop(0), await fleet.start()
                workers.append(new)
                pool.update(map(tcp_address, [old, *workers]))
                await fleet.stop([old])
                pool.update(map(tcp_address, workers))
        await fleet.stop(workers)
    return ledger, fleet.exit_codes, budget


async def scale_tcp(size: Size) -> tuple[Ledger, list[int], RetryBudget]:
    ledger, budget = Ledger(), RetryBudget()
    async with trio.open_nursery() as processes, AsyncExitStack() as stack:
        fleet = Fleet(processes, ())
        workers = await fleet.start_many(4)
        pool = await stack.enter_async_context(
            TcpPool.connect(map(tcp_address, workers), retry_budget=budget)
        )
        await pool.wait_usable(4)
        request = {"max_tokens": size.tokens, "itl_ms": size.itl_ms}
        async with under_load(lambda: pool.stream("generate", request), ledger, size):
            leaving, workers = workers[1:], workers[:1]
            await fleet.stop(leaving)  # 4 -> 1
            pool.update(map(tcp_address, workers))
            await trio.sleep(size.settle_s)  # one worker carries the whole load for a while
            workers += await fleet.start_many(3)  # 1 -> 4: three start (and load their model) at once
            pool.update(map(tcp_address, workers))
            await pool.wait_usable(4)
        await fleet.stop(workers)
    return ledger, fleet.exit_codes, budget


async def rolling_nats(size: Size) -> tuple[Ledger, list[int], RetryBudget]:
    ledger, budget = Ledger(), RetryBudget()
    async with trio.open_nursery() as servers:
        server, url = await start_nats_server(servers)
        try:
            async with trio.open_nursery() as processes, AsyncExitStack() as stack:
                fleet = Fleet(processes, ("--nats", url, "--namespace", "roll"))
                workers = await fleet.start_many(size.workers)
                client = await stack.enter_async_context(
                    NatsClient.connect(url, namespace="roll", retry_budget=budget)
                )
                request = {"max_tokens": size.tokens, "itl_ms": size.itl_ms}
                async with under_load(lambda: client.stream("generate", request), ledger, size):
                    for _ in range(size.workers):
                        old = workers.pop(0)
                        workers.append(await fleet.start())
                        await fleet.stop([old])
                await fleet.stop(workers)
        finally:
            server.terminate()
            with trio.move_on_after(10, shield=True):
                await server.wait()
    return ledger, fleet.exit_codes, budget


MODES: dict[str, Callable[[Size], Awaitable[tuple[Ledger, list[int], RetryBudget]]]] = {
    "tcp": rolling_tcp,
    "nats": rolling_nats,
    "scale": scale_tcp,
}


async def run_mode(name: str, size: Size) -> bool:
    try:
        with trio.fail_after(RUN_TIMEOUT):
            ledger, exit_codes, budget = await MODES[name](size)
    except trio.TooSlowError:
        print(f"rolling_update {name}: HUNG (not finished within {RUN_TIMEOUT:g} s)")
        return False
    lost = sum(ledger.lost.values())
    bad_exits = [code for code in exit_codes if code != 0]
    verdict = "OK" if lost == 0 and not bad_exits and ledger.completed else "FAILED"
    details = " ".join(f"{k}={v}" for k, v in sorted(ledger.lost.items()))
    print(
        f"rolling_update {name}: requests={ledger.requests} completed={ledger.completed} "
        f"retried={budget.retries} lost={lost}{' (' + details + ')' if details else ''} "
        f"first_chunk_p50/p99 before={ledger.latency('before')} during={ledger.latency('during')} "
        f"after={ledger.latency('after')} exit_codes={exit_codes} -> {verdict}",
        flush=True,
    )
    return verdict == "OK"


async def main(modes: list[str], size: Size) -> int:
    results = [await run_mode(name, size) for name in modes]
    return 0 if all(results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="a small, fast run for CI")
    parser.add_argument("--mode", choices=sorted(MODES), action="append", help="only this mode (repeatable)")
    options = parser.parse_args()
    sys.exit(trio.run(main, options.mode or list(MODES), SIZES["short" if options.short else "full"]))
