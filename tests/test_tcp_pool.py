"""TcpPool, the client over many workers: least-loaded choice, GOAWAY, retries before the first chunk
only, addresses that come and go, and a fleet with nobody to serve."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from runtime import ErrorCode, IngressError, Overloaded, RetryBudget, Worker, WorkerConfig, open_worker
from runtime.testing import worker_process
from transports.tcp import TcpClient, TcpPool, TcpTransport
from transports.tcp import _protocol as codec

TEST_TIMEOUT = 20


class Fleet:
    """Workers named A, B, ... whose handlers record who served what; ``hold`` waits for ``release``."""

    def __init__(self) -> None:
        self.served: Counter[str] = Counter()
        self.holding: Counter[str] = Counter()
        self.release = trio.Event()
        self._changed = trio.Event()

    def worker(self, name: str, *, refuse: bool) -> Worker:
        worker = Worker(name)

        @worker.endpoint("who")
        async def who(request, ctx):
            self.served[name] += 1
            if refuse:
                raise Overloaded("this worker refuses everything", retryable=True)
            return name

        @worker.endpoint("echo")
        async def echo(request, ctx):
            return name

        @worker.endpoint("hold")
        async def hold(request, ctx):
            self.holding[name] += 1
            self._changed.set()
            self._changed = trio.Event()
            await self.release.wait()
            for i in range(request.get("n", 1)):
                yield {"worker": name, "i": i}

        return worker

    async def wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


@asynccontextmanager
async def fleet_of(fleet: Fleet, *names: str, refuse: str = "") -> AsyncIterator[dict[str, Any]]:
    """One worker per name (TCP on an ephemeral port): name -> (handle, address)."""
    async with AsyncExitStack() as stack:
        workers = {}
        for name in names:
            transport = TcpTransport(port=0)
            config = WorkerConfig(drain_timeout=10)
            worker = fleet.worker(name, refuse=name == refuse)
            handle = await stack.enter_async_context(open_worker(worker, [transport], config))
            workers[name] = (handle, handle.addresses["tcp"])
        yield workers


async def _hold(pool: TcpPool, results: list[list[Any]], n: int = 1) -> None:
    results.append([chunk async for chunk in pool.stream("hold", {"n": n})])


async def _hold_streams(
    pool: TcpPool, fleet: Fleet, nursery: trio.Nursery, count: int, results: list
) -> None:
    """Open ``count`` held streams one after the other (each registered before the next is chosen)."""
    for _ in range(count):
        before = sum(fleet.holding.values())
        nursery.start_soon(_hold, pool, results)
        await fleet.wait(lambda before=before: sum(fleet.holding.values()) > before)


async def test_streams_go_to_the_least_loaded_worker():
    """Eight held streams over two workers: four each (the pool counts its own open streams)."""
    fleet, results = Fleet(), []
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            fleet_of(fleet, "A", "B") as workers,
            TcpPool.connect(a for _, a in workers.values()) as pool,
        ):
            await pool.wait_usable(2)
            async with trio.open_nursery() as nursery:
                await _hold_streams(pool, fleet, nursery, 8, results)
                spread = dict(fleet.holding)
                fleet.release.set()
    assert spread == {"A": 4, "B": 4} and len(results) == 8


async def test_other_callers_load_from_the_report_counts_too():
    """A carries three streams of another client: the pool's next three go to B (its report says so)."""
    fleet, results = Fleet(), []
    with trio.fail_after(TEST_TIMEOUT):
        async with fleet_of(fleet, "A", "B") as workers:
            (_, a), (_, b) = workers["A"], workers["B"]
            async with TcpClient.connect(*a) as other, trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(_drain_stream, other)
                await fleet.wait(lambda: fleet.holding["A"] == 3)
                async with TcpPool.connect([a, b]) as pool, trio.open_nursery() as streams:
                    await pool.wait_usable(2)
                    await _hold_streams(pool, fleet, streams, 3, results)
                    spread = dict(fleet.holding)
                    fleet.release.set()
    assert spread == {"A": 3, "B": 3}


async def _drain_stream(client: TcpClient) -> None:
    async for _ in client.stream("hold", {}):
        pass


async def test_a_worker_still_loading_its_model_gets_nothing_until_it_is_ready():
    """A restarting worker (engine loading) is asked for its load at connect: no request is sent to it
    (no retry spent) until it reports ready, which the pool notices without waiting for a heartbeat."""
    fleet = Fleet()
    budget = RetryBudget()
    loading = {"INGRESS_MOCKER_LOAD_S": "1.5"}
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            fleet_of(fleet, "B") as workers,
            worker_process("--tcp", "127.0.0.1:0", wait_ready=False, env=loading) as mocker,
        ):
            await mocker.wait_event("worker.listening")
            addresses = [mocker.addresses["tcp"], workers["B"][1]]
            async with TcpPool.connect(addresses, retry_budget=budget) as pool:
                await pool.wait_usable(1)
                answers = [await pool.call("who") for _ in range(10)]
                with trio.fail_after(5):  # the load, plus a recheck: not the 10 s heartbeat
                    await pool.wait_usable(2)
                echoed = await _echo_on_mocker(pool)
    assert answers == ["B"] * 10 and budget.retries == 0 and fleet.served["B"] == 10
    assert echoed


async def _echo_on_mocker(pool: TcpPool) -> bool:
    """The mocker (ready now) takes requests: its ``echo`` answers with the request, B's with "B"."""
    for _ in range(30):  # ties are broken at random: the mocker is picked now and then
        if await pool.call("echo", {"x": 1}) != "B":
            return True
    return False


async def test_a_draining_worker_finishes_its_streams_and_new_ones_go_elsewhere():
    """GOAWAY: A (less loaded) is draining, so every new call goes to B; A's running stream ends whole."""
    fleet, results = Fleet(), []
    with trio.fail_after(TEST_TIMEOUT):
        async with fleet_of(fleet, "A", "B") as workers:
            (a_handle, a), (_, b) = workers["A"], workers["B"]
            async with TcpPool.connect([b]) as pool, trio.open_nursery() as nursery:
                await _hold_streams(pool, fleet, nursery, 2, results)  # B: 2
                pool.update([a, b])
                await pool.wait_usable(2)
                nursery.start_soon(_hold, pool, results, 5)  # A: 1, the least loaded from now on
                await fleet.wait(lambda: fleet.holding["A"] == 1)
                a_handle.shutdown("test")
                answers = [await pool.call("who") for _ in range(10)]
                a_state = next(w for w in pool.workers() if w["address"] == f"{a[0]}:{a[1]}")
                fleet.release.set()
    assert answers == ["B"] * 10 and fleet.served["A"] == 0 and not a_state["usable"]
    assert [{"worker": "A", "i": i} for i in range(5)] in results and len(results) == 3


async def test_a_retryable_refusal_is_retried_on_another_worker_within_the_budget():
    """A refuses everything (OVERLOADED, retryable): every call is answered by B, one retry per refusal."""
    fleet = Fleet()
    budget = RetryBudget(ratio=1.0, reserve=100)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            fleet_of(fleet, "A", "B", refuse="A") as workers,
            TcpPool.connect((a for _, a in workers.values()), retry_budget=budget) as pool,
        ):
            await pool.wait_usable(2)
            answers = [await pool.call("who") for _ in range(30)]
    assert answers == ["B"] * 30
    assert budget.retries == fleet.served["A"] > 0  # ties are broken at random: A is tried now and then


@asynccontextmanager
async def breaking_worker(after_chunk: bool, requests: list[int]) -> AsyncIterator[tuple[str, int]]:
    """A version-4 worker that closes each connection on its first REQUEST, after one DATA or before."""

    async def handler(stream: trio.SocketStream) -> None:
        conn = codec.Connection(codec.Role.SERVER)
        while True:
            event = conn.next_event()
            if event is codec.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, codec.Hello):
                await stream.send_all(conn.send(conn.local_hello))
            elif isinstance(event, codec.Ping):
                await stream.send_all(conn.send(codec.Pong(event.opaque, b'{"ready":true,"in_flight":0}')))
            elif isinstance(event, codec.Request):
                requests.append(event.stream_id)
                if after_chunk:
                    await stream.send_all(conn.send_data(event.stream_id, b'"first"'))
                return
            elif isinstance(event, codec.ConnectionClosed):
                return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def _extend(chunks: list[Any], stream: AsyncIterator[Any]) -> None:
    async for chunk in stream:
        chunks.append(chunk)


@pytest.mark.parametrize("after_chunk", [False, True])
async def test_a_lost_connection_is_retried_before_the_first_chunk_and_never_after(after_chunk):
    """Lost before any chunk: tried again (4 attempts in all); lost after one: raised, never retried."""
    requests: list[int] = []
    chunks: list[Any] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with breaking_worker(after_chunk, requests) as address, TcpPool.connect([address]) as pool:
            with pytest.raises(IngressError) as caught:
                await _extend(chunks, pool.stream("generate", {}))
    assert caught.value.code is ErrorCode.UNAVAILABLE
    if after_chunk:
        assert (chunks, len(requests), pool.retry_budget.retries, caught.value.retryable) == (
            ["first"],
            1,
            0,
            False,
        )
    else:
        assert (chunks, len(requests), pool.retry_budget.retries) == ([], 4, 3)


async def test_an_address_removed_takes_no_new_streams_and_closes_after_its_last():
    """update() without A: new calls go to B, A's stream ends whole, then A's connection is closed."""
    fleet, results = Fleet(), []
    with trio.fail_after(TEST_TIMEOUT):
        async with fleet_of(fleet, "A", "B") as workers:
            a, b = workers["A"][1], workers["B"][1]
            async with TcpPool.connect([a]) as pool:
                async with trio.open_nursery() as nursery:
                    await _hold_streams(pool, fleet, nursery, 1, results)
                    pool.update([b])
                    answers = [await pool.call("who") for _ in range(3)]
                    listed = {w["address"] for w in pool.workers()}
                    fleet.release.set()
                await trio.testing.wait_all_tasks_blocked()  # A's connection closes once its stream ended
                after = {w["address"] for w in pool.workers()}
    assert answers == ["B"] * 3 and results == [[{"worker": "A", "i": 0}]]
    assert listed == {f"{a[0]}:{a[1]}", f"{b[0]}:{b[1]}"} and after == {f"{b[0]}:{b[1]}"}


async def test_an_address_removed_and_given_back_while_it_finishes_is_served_again():
    """update() without A, then with A again before its last stream ended: A takes calls again."""
    fleet, results = Fleet(), []
    with trio.fail_after(TEST_TIMEOUT):
        async with fleet_of(fleet, "A") as workers:
            a = workers["A"][1]
            async with TcpPool.connect([a], wait_for_worker=5) as pool, trio.open_nursery() as nursery:
                await _hold_streams(pool, fleet, nursery, 1, results)
                pool.update([])
                pool.update([a])
                answer = await pool.call("who")
                fleet.release.set()
    assert answer == "A" and results == [[{"worker": "A", "i": 0}]]


async def test_with_no_reachable_worker_a_request_fails_retryably_and_says_why():
    """Nothing listens: after wait_for_worker, UNAVAILABLE (retryable) naming the address and the cause."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(TEST_TIMEOUT):
        async with TcpPool.connect([("127.0.0.1", port)], wait_for_worker=0.3) as pool:
            with pytest.raises(IngressError) as caught:
                await pool.call("who")
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
    assert f"127.0.0.1:{port}: cannot connect" in caught.value.message
    assert pool.retry_budget.retries == 0  # having waited, retrying at once would only wait again
