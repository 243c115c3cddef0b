"""Benchmark: the runtime's NATS transport against a pure-asyncio nats-py responder, in one run.

One nats-server on 127.0.0.1. Two responders, each its own process: the mocker under
``ingress serve --nats`` (namespace ``bench``) and a plain asyncio nats-py responder doing the same work
(namespace ``base``: ``echo`` replies once, ``generate`` publishes one message per token and an end
message, with the same headers). The load is a third process, pure asyncio nats-py: 32 concurrent
requesters for round trips, and 32 concurrent streams for streamed messages/s. Median of three rounds,
responders alternated; read the ratios.

    python scripts/bench_nats.py            # full run
    python scripts/bench_nats.py --quick

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


async def load(url: str, namespace: str, calls: int, tokens: int) -> None:
    import nats

    client = await nats.connect(url)

    async def round_trips() -> None:
        for i in range(calls):
            await client.request(f"{namespace}.echo", json.dumps({"i": i}).encode(), timeout=10)

    start = time.perf_counter()
    await asyncio.gather(*(round_trips() for _ in range(REQUESTERS)))
    rtt = REQUESTERS * calls / (time.perf_counter() - start)

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
        request = json.dumps({"max_tokens": tokens}).encode()
        await client.publish(f"{namespace}.generate", request, reply=inbox)
        count = await asyncio.wait_for(done, timeout=60)
        await subscription.unsubscribe()
        return int(count)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one_stream() for _ in range(REQUESTERS)))
    streamed = sum(counts) / (time.perf_counter() - start)
    await client.close()
    print(json.dumps({"round_trips": rtt, "streamed": streamed, "complete": counts == [tokens] * REQUESTERS}))


# ---- orchestration (trio) -----------------------------------------------------------------------------


async def run(quick: bool) -> None:
    import trio

    from runtime.testing import nats_server, spawn_process, worker_process

    calls, tokens = (50, 200) if quick else (300, 1000)
    async with nats_server() as url:
        ours_args = ("--nats", url, "--namespace", "bench", "--no-access-log")
        async with worker_process(*ours_args), spawn_process([sys.executable, __file__, "--baseline", url]):
            results: dict[str, list[dict[str, float]]] = {"bench": [], "base": []}
            for _ in range(3):
                for namespace in results:
                    command = [sys.executable, __file__, "--load", url, namespace, str(calls), str(tokens)]
                    done = await trio.run_process(command, capture_stdout=True)
                    measured = json.loads(done.stdout.decode().strip().splitlines()[-1])
                    if not measured["complete"]:
                        raise RuntimeError(f"{namespace}: a stream came back short")
                    results[namespace].append(measured)
    print(f"{'workload':34} {'ingress':>12} {'asyncio nats-py':>16} {'ratio':>7}  goal")
    for key, label, goal in (
        ("round_trips", f"round trips/s, {REQUESTERS} requesters", ">= 0.5x"),
        ("streamed", f"streamed msgs/s, {REQUESTERS} streams", ">= 0.8x"),
    ):
        ours = statistics.median(r[key] for r in results["bench"])
        base = statistics.median(r[key] for r in results["base"])
        print(f"{label:34} {ours:12.0f} {base:16.0f} {ours / base:6.2f}x  {goal}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--baseline":
        asyncio.run(baseline(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--load":
        asyncio.run(load(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    else:
        parser = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument(
            "--quick", action="store_true", help="small sizes: a smoke test, not a measurement"
        )
        import trio

        trio.run(run, parser.parse_args().quick)
