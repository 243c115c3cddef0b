"""Reproduce hypercorn 0.18's BusyResourceError end to end with h2load, on stock hypercorn and on ours.

Two worker processes serve the mocker over HTTP on 127.0.0.1: one with the runtime's own connection loop
(runtime/_http_server.py), one with the same app under hypercorn's stock trio server (its TCPServer).
h2load (from Debian's nghttp2-client; not a Python package, so this is not part of CI) opens 20 h2c
connections x 10 streams of long SSE streams for 2 s, then closes them mid-stream; that is a round.
After each round the script asks each worker's /health. With stock hypercorn a connection that closes
while a stream is sending can raise BusyResourceError out of the connection's task group, and
hypercorn's serve() ends: the whole worker stops answering. With the owned loop that stays one
connection's business.

    python scripts/h2_close_storm.py            # 8 rounds
    python scripts/h2_close_storm.py --rounds 3

Prints what each worker survived; exits 1 if the patched one went down, 2 without h2load. The stock
worker going down is the reproduction (it does not always happen in the first round: it is a race).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile

import httpx
import trio

H2LOAD_TIMEOUT = 30.0  # one h2load round; it runs for 2 s
BODY = {"max_tokens": 2000, "itl_ms": 1}


class StockHttp:
    """The HTTP transport's app under hypercorn's own ``serve`` (stock TCPServer), for comparison."""

    name = "http"

    async def serve(self, binding, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from urllib.parse import urlsplit

        from hypercorn.trio import serve

        from transports.http import HttpTransport
        from transports.http._app import IngressApp

        transport = HttpTransport("127.0.0.1", 0)
        app = IngressApp(binding, max_body_size=transport.max_body_size, stream_high_water=64 * 1024)
        config = transport.hypercorn_config()
        config.bind = ["127.0.0.1:0"]
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
            bound = urlsplit(binds[0])
            task_status.started((bound.hostname, bound.port))


def serve(variant: str) -> None:
    """Run one worker (HTTP on an ephemeral port, JSON logs): ``stock`` runs hypercorn's own server."""
    from runtime import WorkerConfig, configure_logging
    from runtime.mocker import create_mocker
    from transports.http import HttpTransport

    configure_logging("json")
    transport = StockHttp() if variant == "stock" else HttpTransport("127.0.0.1", 0)
    create_mocker().run([transport], WorkerConfig(access_log=False))


async def alive(client: httpx.AsyncClient, address: tuple[str, int]) -> bool:
    try:
        response = await client.get(f"http://{address[0]}:{address[1]}/health", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def run(rounds: int) -> int:
    from runtime.testing import spawn_process

    h2load = shutil.which("h2load")
    if h2load is None:
        print("h2load not found: it comes with Debian's nghttp2-client (apt-get install nghttp2-client)")
        return 2
    down_in: dict[str, int | None] = {"stock": None, "ingress": None}  # the round a worker went down
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body:
        json.dump(BODY, body)
        body.flush()
        async with (
            spawn_process([sys.executable, __file__, "--serve", "stock"]) as stock,
            spawn_process([sys.executable, __file__, "--serve", "ingress"]) as ours,
            httpx.AsyncClient() as client,
        ):
            workers = {"stock": stock.addresses["http"], "ingress": ours.addresses["http"]}
            for round_number in range(1, rounds + 1):
                for name, (host, port) in workers.items():
                    if down_in[name] is not None:
                        continue
                    url = f"http://{host}:{port}/v1/generate"
                    command = [h2load, "-c", "20", "-m", "10", "-D", "2", "-d", body.name, url]
                    command += ["-H", "content-type: application/json"]
                    with trio.move_on_after(H2LOAD_TIMEOUT):
                        await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
                    if not await alive(client, (host, port)):
                        down_in[name] = round_number
            busy = sum("BusyResourceError" in json.dumps(event) for event in stock.events)
    for name, down in down_in.items():
        print(
            f"{name}: "
            + (f"stopped answering after round {down}" if down else f"alive after {rounds} rounds")
        )
    print(f"stock hypercorn log lines mentioning BusyResourceError: {busy}")
    return 1 if down_in["ingress"] is not None else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        parser = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("--rounds", type=int, default=8, help="h2load rounds per worker (default 8)")
        raise SystemExit(trio.run(run, parser.parse_args().rounds))
