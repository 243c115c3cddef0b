"""Benchmark: the runtime's HTTP transport against a bare hypercorn-trio app and uvicorn, in one run.

This process is only the load generator; the three servers run as their own processes on 127.0.0.1:
the mocker under ``ingress serve --http``, and the bare ASGI app of scripts/bench_http_baselines.py under
hypercorn's trio worker and under uvicorn. Workloads: SSE streams (16 streams x 1000 tokens) and small
unary JSON requests (32 connections), over HTTP/1.1 and h2c (uvicorn speaks no HTTP/2). Each figure is the
median of three rounds, alternating the servers; read the ratios.

    python scripts/bench_http.py            # full run
    python scripts/bench_http.py --quick    # smaller sizes, a smoke test
    python scripts/bench_http.py --secure   # our worker with --auth-tokens and TLS (the baselines without)

Goals (from the issue): SSE tokens/s at least uvicorn's; unary at least 0.9x the bare hypercorn-trio app.

The loads an inference fleet runs (issue 11, scripts/_bench_loads.py), against the bare app under
hypercorn-trio over HTTP/1.1 SSE: a sweep of 1 to 1,024 concurrent streams (one per connection) of 100
tokens, 0 and 20 ms apart (tokens/s and the server's CPU per token), and the first-chunk latency (p50,
p99) of new streams while 256 streams keep the server saturated. Goals: at 1,024 streams 20 ms apart,
>= 1.0x the bare app's tokens/s with CPU per token <= its; first chunk <= 2x its at p50 and p99.
Needs uvicorn installed (``pip install uvicorn``); only this benchmark uses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio
from _bench_loads import LoadSizes, Side, inference_loads, progress, rss_bytes
from _secure import Secure, secured

from runtime._tls import client_context
from runtime.testing import WorkerProcess, spawn_process, worker_process

BASELINES = pathlib.Path(__file__).with_name("bench_http_baselines.py")
RUN_TIMEOUT = 900.0  # the whole benchmark stops by itself after this long
_END = b"\r\n0\r\n\r\n"  # the last bytes of a chunked HTTP/1.1 body


@dataclass(frozen=True)
class Sizes:
    streams: int
    tokens: int
    unary_connections: int
    unary_calls: int
    loads: LoadSizes = field(default_factory=LoadSizes)
    parked_streams: int = 500


FULL = Sizes(16, 1000, 32, 300)
QUICK = Sizes(16, 200, 32, 50, LoadSizes((1, 64), (0, 20), 20, 64, 1.0), 100)


# --secure: our worker serves with --auth-tokens and TLS (scripts/_secure.py); the clients speak TLS
# and send the token to the addresses listed here (our worker's), the baselines stay cleartext.
SECURE: Secure | None = None
SECURED: set[tuple[str, int]] = set()


async def _connect(address: tuple[str, int], alpn: str) -> Stream:
    raw = await trio.open_tcp_stream(*address)
    if SECURE is None or tuple(address) not in SECURED:
        return raw
    context = client_context(SECURE.cafile)
    context.set_alpn_protocols([alpn])
    return trio.SSLStream(raw, context, server_hostname=address[0])


def _auth_headers(address: tuple[str, int]) -> list[tuple[str, str]]:
    secured = SECURE is not None and tuple(address) in SECURED
    return [("authorization", f"Bearer {SECURE.token}")] if secured and SECURE else []


Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class H1:
    """A thin keep-alive HTTP/1.1 client: counts tokens, decodes nothing it does not have to."""

    def __init__(self, stream: Stream, extra_headers: str = "") -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.extra_headers = extra_headers

    @classmethod
    async def open(cls, address: tuple[str, int]) -> H1:
        extra = "".join(f"{name}: {value}\r\n" for name, value in _auth_headers(address))
        return cls(await _connect(address, "http/1.1"), extra)

    async def run(
        self, endpoint: str, body: dict[str, Any], on_first: Callable[[], None] | None = None
    ) -> int:
        """One request to ``/v1/<endpoint>``, for scripts/_bench_loads.py."""
        return await self.post(f"/v1/{endpoint}", body, on_first)

    async def post(self, path: str, body: dict[str, Any], on_first: Callable[[], None] | None = None) -> int:
        """Tokens streamed (1 for a JSON answer); ``on_first()`` once the first token has come."""
        await self._send(path, body)
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head_end = self.buffer.index(b"\r\n\r\n") + 4
        headers = bytes(self.buffer[:head_end]).lower()
        del self.buffer[:head_end]
        if b"content-length:" in headers:
            length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0])
            while len(self.buffer) < length:
                await self._fill()
            del self.buffer[:length]
            return 1
        while not self.buffer.endswith(_END):
            if on_first is not None and b'"token"' in self.buffer:
                on_first()
                on_first = None
            await self._fill()
        if on_first is not None:  # the whole stream came in one read
            on_first()
        tokens = self.buffer.count(b'"token"')
        self.buffer.clear()
        return tokens

    async def open_stream(self, path: str, body: dict[str, Any]) -> None:
        """Start a stream and return once its first token has come (the rest is never read)."""
        await self._send(path, body)
        while b'"token"' not in self.buffer:
            await self._fill()

    async def _send(self, path: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"{self.extra_headers}content-length: {len(payload)}\r\n\r\n"
        )
        await self.stream.send_all(head.encode() + payload)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class H2:
    """A thin h2c (prior knowledge) client on the h2 library; many streams at once on one connection."""

    def __init__(self, stream: Stream, secured: list[tuple[str, str]] | None = None) -> None:
        self.stream = stream
        self.scheme = "https" if secured is not None else "http"
        self.extra_headers = secured or []
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.bodies: dict[int, bytearray] = {}
        self.done: dict[int, trio.Event] = {}
        self.send_lock = trio.Lock()

    @classmethod
    async def open(cls, address: tuple[str, int]) -> H2:
        secured = _auth_headers(address) if SECURE is not None and tuple(address) in SECURED else None
        client = cls(await _connect(address, "h2"), secured)
        client.conn.initiate_connection()
        await client.stream.send_all(client.conn.data_to_send())
        return client

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def post(self, path: str, body: dict[str, int]) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.bodies[stream_id], self.done[stream_id] = bytearray(), trio.Event()
        headers = [(":method", "POST"), (":path", path), (":scheme", self.scheme), (":authority", "bench")]
        headers += self.extra_headers
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, json.dumps(body).encode(), end_stream=True)
        await self.flush()
        await self.done[stream_id].wait()
        # Counted at the end: a DATA frame boundary may split a token's text.
        return max(1, self.bodies.pop(stream_id).count(b'"token"'))

    async def read_loop(self) -> None:
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.done[event.stream_id].set()
            await self.flush()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def sse_tokens_per_second(address: tuple[str, int], protocol: str, sizes: Sizes) -> float:
    body = {"max_tokens": sizes.tokens}
    counts: list[int] = []
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        if protocol == "h2c":
            client = await H2.open(address)
            nursery.start_soon(client.read_loop)
            async with trio.open_nursery() as streams:
                for _ in range(sizes.streams):
                    streams.start_soon(lambda: _count(client.post("/v1/generate", body), counts))
            nursery.cancel_scope.cancel()
            await client.aclose()
        else:
            for _ in range(sizes.streams):
                nursery.start_soon(_h1_stream, address, body, counts)
    elapsed = time.perf_counter() - start
    assert counts == [sizes.tokens] * sizes.streams, f"short streams: {counts}"
    return sum(counts) / elapsed


async def _count(call: Awaitable[int], counts: list[int]) -> None:
    counts.append(await call)


async def _h1_stream(address: tuple[str, int], body: dict[str, int], counts: list[int]) -> None:
    client = await H1.open(address)
    counts.append(await client.post("/v1/generate", body))
    await client.aclose()


async def unary_requests_per_second(address: tuple[str, int], protocol: str, sizes: Sizes) -> float:
    opener: Callable[[tuple[str, int]], Awaitable[H1 | H2]] = H2.open if protocol == "h2c" else H1.open
    clients = [await opener(address) for _ in range(sizes.unary_connections)]
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for client in clients:
            if isinstance(client, H2):
                nursery.start_soon(client.read_loop)
        async with trio.open_nursery() as callers:
            for client in clients:
                callers.start_soon(_calls, client, sizes.unary_calls)
        nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - start
    for client in clients:
        await client.aclose()
    return sizes.unary_connections * sizes.unary_calls / elapsed


async def _calls(client: H1 | H2, count: int) -> None:
    for i in range(count):
        await client.post("/v1/echo", {"i": i})


# A parked stream waits this long between its two tokens: longer than the measurement takes.
PARK_MS = 20_000


async def bytes_per_parked_stream(server: WorkerProcess, count: int) -> float:
    """Server memory per SSE stream parked between two tokens (a generation waiting on its model, the
    normal state of most streams on a busy worker): ``count`` streams over HTTP/1.1, one per
    connection, each past its first token; the server's RSS before and after."""
    address = server.addresses["http"]
    warm = await H1.open(address)  # first-use allocations are not per-stream cost
    await warm.post("/v1/echo", {})
    before = rss_bytes(server.pid)
    clients = [await H1.open(address) for _ in range(count)]
    for client in clients:
        await client.open_stream("/v1/generate", {"max_tokens": 2, "itl_ms": PARK_MS})
    after = rss_bytes(server.pid)
    for client in [warm, *clients]:
        await client.aclose()
    return (after - before) / count


async def main(sizes: Sizes, secure: bool) -> None:
    with secured() if secure else nullcontext() as security:
        global SECURE
        SECURE = security
        await _measure(sizes, security.serve_args if security else ())


async def _measure(sizes: Sizes, security_args: tuple[str, ...]) -> None:
    servers: dict[str, WorkerProcess] = {}
    rows = []
    with trio.fail_after(RUN_TIMEOUT):
        async with (
            worker_process("--http", "127.0.0.1:0", "--no-access-log", *security_args) as ours,
            spawn_process([sys.executable, str(BASELINES), "hypercorn-trio"]) as bare,
            spawn_process([sys.executable, str(BASELINES), "uvicorn"]) as uvicorn,
        ):
            servers = {"ingress": ours, "hypercorn-trio": bare, "uvicorn": uvicorn}
            SECURED.add(tuple(ours.addresses["http"]))
            for label, measure, protocol, names in [
                ("SSE tokens/s", sse_tokens_per_second, "http/1.1", list(servers)),
                ("SSE tokens/s", sse_tokens_per_second, "h2c", ["ingress", "hypercorn-trio"]),
                ("unary req/s", unary_requests_per_second, "http/1.1", list(servers)),
                ("unary req/s", unary_requests_per_second, "h2c", ["ingress", "hypercorn-trio"]),
            ]:
                progress(f"{label} {protocol}")
                results: dict[str, list[float]] = {name: [] for name in names}
                for _ in range(3):
                    for name in names:
                        results[name].append(await measure(servers[name].addresses["http"], protocol, sizes))
                rows.append((f"{label} {protocol}", {n: statistics.median(v) for n, v in results.items()}))
            # The inference-fleet loads over HTTP/1.1 (SSE, one stream per connection), against the
            # bare app under hypercorn-trio: the stack the runtime is built on.
            loads = await inference_loads(
                Side(H1.open, ours, ours.addresses["http"]),
                Side(H1.open, bare, bare.addresses["http"]),
                sizes.loads,
                tag=", http/1.1",
            )
        # In processes of their own that have served nothing else (memory freed by the loads above would
        # be reused and hide the cost); the bare app's parked handlers outlive their callers anyway.
        progress("parked SSE streams")
        async with (
            worker_process("--http", "127.0.0.1:0", "--no-access-log", *security_args) as fresh_ours,
            spawn_process([sys.executable, str(BASELINES), "hypercorn-trio"]) as fresh_bare,
        ):
            SECURED.add(tuple(fresh_ours.addresses["http"]))
            loads.append(
                (
                    f"bytes per parked SSE stream, {sizes.parked_streams} streams, http/1.1",
                    await bytes_per_parked_stream(fresh_ours, sizes.parked_streams),
                    await bytes_per_parked_stream(fresh_bare, sizes.parked_streams),
                    "<= 1.0x",
                )
            )
    if security_args:
        print(
            "ingress: with --auth-tokens and TLS (its h2c rows are h2 over TLS); the baselines in cleartext"
        )
    print(f"{'workload':24} {'ingress':>12} {'hypercorn-trio':>15} {'uvicorn':>12}  ratios")
    for label, values in rows:
        ours_value = values["ingress"]
        cells = [
            f"{values.get(n, float('nan')):>{w}.0f}" if n in values else f"{'-':>{w}}"
            for n, w in (("ingress", 12), ("hypercorn-trio", 15), ("uvicorn", 12))
        ]
        ratios = ", ".join(f"{ours_value / v:.2f}x {n}" for n, v in values.items() if n != "ingress")
        print(f"{label:24} {' '.join(cells)}  {ratios}")
    print()
    print(f"{'metric':74} {'ingress':>10} {'hypercorn-trio':>15} {'ratio':>7}  goal")
    for label, ours_value, bare_value, goal in loads:
        ratio = ours_value / bare_value if bare_value else float("nan")
        print(f"{label:74} {ours_value:10.1f} {bare_value:15.1f} {ratio:6.2f}x  {goal}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="our worker with --auth-tokens and TLS on (the baselines without)",
    )
    args = parser.parse_args()
    if importlib.util.find_spec("uvicorn") is None:  # the baseline runs in its own process: say it here
        sys.exit("bench_http: uvicorn is the baseline and is not installed: pip install -e '.[test,bench]'")
    trio.run(main, QUICK if args.quick else FULL, args.secure)
