"""Benchmark: the runtime's NATS transport against a pure-asyncio nats-py responder, in one run.

One nats-server on 127.0.0.1. Two responders, each its own process: the mocker under
``ingress serve --nats`` (namespace ``bench``) and a plain asyncio nats-py responder doing the same work
(namespace ``base``: ``echo`` replies once, ``generate`` publishes one message per token and an end
message, with the same headers). The load is a third process, pure asyncio nats-py: 32 concurrent
requesters for round trips, and 32 concurrent streams for streamed messages/s. Median of three rounds,
responders alternated; read the ratios. It also prints each responder's CPU time per message (from
/proc, so Linux only): on 2 shared cores the load generator and nats-server compete with the responder,
so throughput ratios understate what a busy worker costs, and CPU per message says it directly.

    python scripts/bench_nats.py            # full run
    python scripts/bench_nats.py --quick
    python scripts/bench_nats.py --secure   # our worker with --auth-tokens (the baseline without)

Goals (from the issue): round trips >= 0.5x the pure-asyncio responder, streamed messages/s >= 0.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

REQUESTERS = 32


# ---- the baseline responder (asyncio) -------------------------------------------------------------


async def baseline(url: str) -> None:
    import nats

    client = await nats.connect(url)

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await client.publish(msg.reply, msg.data, headers={"Ingress-Kind": "result", "Ingress-Seq": "0"})

    async def generate(msg: nats.aio.msg.Msg) -> None:
        count = json.loads(msg.data).get("max_tokens", 16)
        for index in range(count):
            chunk = json.dumps({"index": index, "token": f"tok{index}"}, separators=(",", ":")).encode()
            await client.publish(
                msg.reply, chunk, headers={"Ingress-Kind": "data", "Ingress-Seq": str(index)}
            )
        end = {"Ingress-Kind": "end", "Ingress-Seq": str(count), "Ingress-Count": str(count)}
        await client.publish(msg.reply, b"", headers=end)

    await client.subscribe("base.echo", queue="base.echo", cb=echo)
    await client.subscribe("base.generate", queue="base.generate", cb=generate)
    print(json.dumps({"event": "worker.ready", "addresses": {"nats": url}}), flush=True)
    await asyncio.Event().wait()


# ---- the load (asyncio) -----------------------------------------------------------------------------


async def load(url: str, namespace: str, mode: str, count: int, token: str = "") -> None:
    """Round trips (``count`` per requester) or streams (``count`` tokens each), 32 at a time; with
    ``token``, every request carries it (``Meta-authorization``, docs/protocol-nats.md)."""
    import nats

    client = await nats.connect(url)
    headers = {"Meta-authorization": f"Bearer {token}"} if token else None

    async def round_trips() -> int:
        for i in range(count):
            await client.request(
                f"{namespace}.echo", json.dumps({"i": i}).encode(), timeout=10, headers=headers
            )
        return count

    async def one_stream() -> int:
        done = asyncio.get_running_loop().create_future()
        received = 0

        async def on_reply(msg: nats.aio.msg.Msg) -> None:
            nonlocal received
            if msg.headers and msg.headers.get("Ingress-Kind") == "data":
                received += 1
            elif not done.done():
                done.set_result(received)

        inbox = client.new_inbox()
        subscription = await client.subscribe(inbox, cb=on_reply)
        request = json.dumps({"max_tokens": count}).encode()
        await client.publish(f"{namespace}.generate", request, reply=inbox, headers=headers)
        received_all = await asyncio.wait_for(done, timeout=60)
        await subscription.unsubscribe()
        return int(received_all)

    work = round_trips if mode == "round_trips" else one_stream
    start = time.perf_counter()
    counts = await asyncio.gather(*(work() for _ in range(REQUESTERS)))
    elapsed = time.perf_counter() - start
    await client.close()
    print(
        json.dumps({"messages": sum(counts), "seconds": elapsed, "complete": counts == [count] * REQUESTERS})
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os
    from pathlib import Path

    # After the command name in parentheses: field 3 (state) first, so utime/stime (14/15) are 11/12.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- orchestration (trio) -----------------------------------------------------------------------------


async def run(quick: bool, secure: bool) -> None:
    from contextlib import nullcontext

    from _secure import secured

    with secured() if secure else nullcontext() as security:
        await _measure(quick, security.auth_args if security else (), security.token if security else "")


async def _measure(quick: bool, auth_args: tuple[str, ...], token: str) -> None:
    import trio

    from runtime.testing import nats_server, spawn_process, worker_process

    sizes = {"round_trips": 50 if quick else 300, "streamed": 200 if quick else 1000}
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    async with nats_server() as url:
        ours_args = ("--nats", url, "--namespace", "bench", "--no-access-log", *auth_args)
        async with (
            worker_process(*ours_args) as ours,
            spawn_process([sys.executable, __file__, "--baseline", url]) as base,
        ):
            responders = {"bench": ours.pid, "base": base.pid}
            for _ in range(3):
                for mode, size in sizes.items():
                    for namespace, pid in responders.items():
                        command = [sys.executable, __file__, "--load", url, namespace, mode, str(size), token]
                        before = cpu_seconds(pid)
                        done = await trio.run_process(command, capture_stdout=True)
                        used = cpu_seconds(pid) - before
                        measured = json.loads(done.stdout.decode().strip().splitlines()[-1])
                        if not measured["complete"]:
                            raise RuntimeError(f"{namespace}: a stream came back short")
                        key = (mode, namespace)
                        rates.setdefault(key, []).append(measured["messages"] / measured["seconds"])
                        cpu.setdefault(key, []).append(used / measured["messages"] * 1e6)
    print(f"{'workload':38} {'ingress':>10} {'asyncio nats-py':>16} {'ratio':>7}  goal")
    for mode, label, goal in (
        ("round_trips", f"round trips/s, {REQUESTERS} requesters", ">= 0.5x"),
        ("streamed", f"streamed msgs/s, {REQUESTERS} streams", ">= 0.8x"),
    ):
        ours_rate = statistics.median(rates[mode, "bench"])
        base_rate = statistics.median(rates[mode, "base"])
        print(f"{label:38} {ours_rate:10.0f} {base_rate:16.0f} {ours_rate / base_rate:6.2f}x  {goal}")
    for mode, label in (
        ("round_trips", "responder CPU us per round trip"),
        ("streamed", "responder CPU us per msg"),
    ):
        ours_cpu = statistics.median(cpu[mode, "bench"])
        base_cpu = statistics.median(cpu[mode, "base"])
        print(f"{label:38} {ours_cpu:10.1f} {base_cpu:16.1f} {ours_cpu / base_cpu:6.2f}x  (lower is better)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--baseline":
        asyncio.run(baseline(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--load":
        asyncio.run(load(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), *sys.argv[6:7]))
    else:
        parser = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument(
            "--quick", action="store_true", help="small sizes: a smoke test, not a measurement"
        )
        parser.add_argument(
            "--secure", action="store_true", help="our worker with --auth-tokens (NATS keeps its own TLS)"
        )
        import trio

        options = parser.parse_args()
        trio.run(run, options.quick, options.secure)
