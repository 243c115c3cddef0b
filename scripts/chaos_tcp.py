"""Chaos for the TCP transport: cut connections mid-stream and mid-exchange, SIGTERM under load, check
the invariants.

Runs a real worker process (the mocker) on 127.0.0.1 and drives it in two rounds:

1. Many streams and full-duplex exchanges (the mocker's ``chat``, through ``TcpClient.exchange()``) over
   many connections; a share of the connections is cut mid-stream, half with a clean close and half with
   a reset (SO_LINGER 0). Afterwards /metrics must show in-flight back at 0, the disconnects counted, and
   the worker's exchange message counters within what the callers sent and read.
2. The same load, with SIGTERM sent once a share of the streams and exchanges is running. Those in
   flight must finish (an exchange's caller goes on sending through the drain); streams, exchanges and
   connections opened later must get an explicit error; the worker must exit 0 with nothing in flight
   at phase 2.

Every stream must end completed with all its tokens, with an explicit error, or cut by this script;
anything else (a truncated stream without an error, a wrong token, a hang) is a violation. Every
exchange likewise, checked in sequence on both sides (scripts/_chaos.py, ``ExchangeCheck``): each
answer once and in order, each turn as long as its message asked, so each message taken by the worker
once and in order, and the end only after the half-close and the last turn. Prints one summary line
and exits 1 on any violation.

    python scripts/chaos_tcp.py            # full run (~30 s)
    python scripts/chaos_tcp.py --short    # CI run (a few seconds)
    python scripts/chaos_tcp.py --secure   # the same with --auth-tokens and TLS on (scripts/_secure.py)
"""

from __future__ import annotations

import random
import signal
import socket
import struct
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import trio
from _chaos import (
    ExchangeLedger,
    Tally,
    check_engine_idle,
    check_exchange_counters,
    inflight_from_metrics,
    record_exchange,
    record_stream,
    run_cli,
)
from _secure import secured

from runtime import IngressError
from runtime.testing import worker_process
from transports.tcp import TcpClient

# A stream that has not ended this long after it started is a hang: a violation, not a wait.
STREAM_TIMEOUT = 60.0
# The whole script stops by itself after this long, whatever happens.
RUN_TIMEOUT = 120.0
# How long in-flight may take to come back to 0 once every caller is done (the worker counts a request
# out just after its last frame left): a leak stays, however long the wait.
SETTLE = 5.0
# A connection's first exchange starts with its streams; the others up to this long later, so that in
# round 2 some open on a live connection after the GOAWAY (refused, retryable) or cross it.
EXCHANGE_STAGGER = 0.2


@dataclass(frozen=True)
class Load:
    connections: int
    streams_per_connection: int
    exchanges_per_connection: int
    cut_share: float
    # With --secure: the TLS context and the token every connection uses.
    connect_options: dict[str, Any] = field(default_factory=dict)

    @property
    def per_round(self) -> int:
        """Streams and exchanges started in one round."""
        return self.connections * (self.streams_per_connection + self.exchanges_per_connection)


async def run_stream(
    client: TcpClient, tally: Tally, rng: random.Random, first_chunk: trio.Event, cut: str | None
) -> None:
    """One stream; records exactly one outcome, or "cut" if the script cut its connection first."""
    max_tokens = rng.randint(20, 200)
    request = {"max_tokens": max_tokens, "itl_ms": rng.randint(1, 5)}
    recorded = False
    try:
        await _stream_into(client, tally, request, first_chunk)
        recorded = True  # _stream_into records every ending except being cancelled by our own cut
    finally:
        if not recorded:
            tally.outcomes[f"cut:{cut}"] += 1


async def run_exchange(
    client: TcpClient,
    tally: Tally,
    rng: random.Random,
    first_chunk: trio.Event,
    cut: str | None,
    ledger: ExchangeLedger,
    delay: float,
) -> None:
    """One exchange beside the streams, ``delay`` later; records exactly one outcome, or "exchange:cut"
    as for streams."""

    def on_answer(count: int) -> None:
        if count == 1:
            tally.stream_started()
            first_chunk.set()

    recorded = False
    try:
        await trio.sleep(delay)
        await record_exchange(client, tally, rng, STREAM_TIMEOUT, ledger, on_answer)
        recorded = True  # record_exchange records every ending except being cancelled by our own cut
    finally:
        if not recorded:
            tally.outcomes[f"exchange:cut:{cut}"] += 1


async def _stream_into(
    client: TcpClient, tally: Tally, request: dict[str, int], first_chunk: trio.Event
) -> None:
    def started() -> None:
        tally.stream_started()
        first_chunk.set()

    await record_stream(
        client.stream("generate", request), request["max_tokens"], tally, STREAM_TIMEOUT, started
    )


async def run_connection(
    address: tuple[str, int],
    load: Load,
    tally: Tally,
    rng: random.Random,
    cut: str | None,
    ledger: ExchangeLedger,
) -> None:
    """One connection with several streams and exchanges; ``cut`` ("close" or "reset") cuts it mid-stream."""
    try:
        async with TcpClient.connect(*address, **load.connect_options) as client:
            with trio.CancelScope() as connection_scope:
                first_chunk = trio.Event()
                async with trio.open_nursery() as cutter:
                    if cut:
                        cutter.start_soon(cut_later, client, cut, rng, first_chunk, connection_scope)
                    async with trio.open_nursery() as streams:
                        for _ in range(load.streams_per_connection):
                            streams.start_soon(run_stream, client, tally, rng, first_chunk, cut)
                        for i in range(load.exchanges_per_connection):
                            delay = rng.random() * EXCHANGE_STAGGER if i else 0.0
                            streams.start_soon(
                                run_exchange, client, tally, rng, first_chunk, cut, ledger, delay
                            )
                    # Every stream ended before the cut (say, all refused during the drain): no cut.
                    cutter.cancel_scope.cancel()
    except IngressError as error:  # connection refused (worker draining): explicit, retryable
        tally.outcomes[f"error:{error.code.name}"] += load.streams_per_connection
        tally.outcomes[f"exchange:error:{error.code.name}"] += load.exchanges_per_connection


async def cut_later(
    client: TcpClient, how: str, rng: random.Random, first_chunk: trio.Event, scope: trio.CancelScope
) -> None:
    await first_chunk.wait()
    await trio.sleep(rng.random() * 0.2)
    sock = getattr(client._stream, "transport_stream", client._stream).socket  # under TLS too
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Like a crashed router: the socket goes first, so no KILL frame gets out; the worker must notice
    # the close (or reset) by itself.
    scope.cancel()
    sock.close()


async def drive(
    address: tuple[str, int], load: Load, tally: Tally, rng: random.Random, ledger: ExchangeLedger
) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(load.connections):
            cut = None
            if rng.random() < load.cut_share:
                cut = "close" if i % 2 else "reset"
            nursery.start_soon(run_connection, address, load, tally, rng, cut, ledger)
            await trio.sleep(rng.random() * 0.01)  # staggered, so some connect during the drain


async def main(short: bool, seed: int, secure: bool) -> int:
    rng = random.Random(seed)
    tally = Tally()
    report: dict[str, object] = {"stage": "starting"}
    with secured() if secure else nullcontext() as security:
        options = {"tls": security.tls, "token": security.token} if security else {}
        load = Load(16, 4, 2, 0.3, options) if short else Load(64, 8, 4, 0.3, options)
        serve_args = security.serve_args if security else ()
        try:
            return await _run(load, tally, report, rng, serve_args)
        except trio.TooSlowError:
            print(
                f"chaos_tcp: HUNG at stage {report['stage']}: {dict(tally.outcomes)} running={tally.running}"
            )
            return 1


async def _run(
    load: Load, tally: Tally, report: dict[str, object], rng: random.Random, serve_args: tuple[str, ...]
) -> int:
    with trio.fail_after(RUN_TIMEOUT):
        args = (
            "--tcp",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--no-access-log",
            "--drain-timeout",
            "30",
            *serve_args,
        )
        async with worker_process(*args) as worker:
            tcp, metrics = worker.addresses["tcp"], worker.addresses["metrics"]
            report["stage"] = "round 1"
            ledger = ExchangeLedger()
            await drive(tcp, load, tally, rng, ledger)
            report["inflight_after_round1"], report["disconnects_counted"] = await inflight_from_metrics(
                metrics, patience=SETTLE
            )
            if report["inflight_after_round1"] != 0:
                tally.violations.append(
                    f"in-flight is {report['inflight_after_round1']} after round 1, not 0"
                )
            cut_in_round1 = tally.cut_count()
            if cut_in_round1 and not report["disconnects_counted"]:
                tally.violations.append(
                    f"{cut_in_round1} streams and exchanges were cut but the worker counted no disconnect"
                )
            report["exchange_messages_round1"] = await check_exchange_counters(metrics, ledger, tally)
            await check_engine_idle(metrics, tally)
            report["stage"] = "round 2"  # SIGTERM once a quarter of the streams and exchanges run
            tally.start_round(load.per_round // 4)
            ledger = ExchangeLedger(drain_begun=trio.Event())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive, tcp, load, tally, rng, ledger)
                await tally.started_enough.wait()
                worker.send_signal(signal.SIGTERM)
                await worker.wait_event("shutdown.phase0.done")  # the drain begins
                ledger.drain_begun.set()
                report["stage"] = "round 2, draining"
            report["exchanges_through_drain"] = ledger.through_drain
            report["stage"] = "waiting for the worker to exit"
            report["exit_code"] = exit_code = await worker.wait_exit()
            phase2 = await worker.wait_event("shutdown.phase2.done")
            del report["stage"]
            report["inflight_at_phase2"] = phase2["in_flight"]
    if exit_code != 0:
        tally.violations.append(f"worker exited {exit_code}, not 0")
    if phase2["in_flight"] != 0:
        tally.violations.append(f"in-flight was {phase2['in_flight']} at the end of phase 2")
    exchanges = 2 * load.connections * load.exchanges_per_connection
    name = "chaos_tcp (auth+TLS)" if serve_args else "chaos_tcp"
    return tally.report(name, 2 * load.connections * load.streams_per_connection, report, exchanges=exchanges)


if __name__ == "__main__":
    run_cli(__doc__, main, secure=True)
