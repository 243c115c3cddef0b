"""A client over many workers that survives scale-in and rolling updates (docs/operations.md "Clients
that survive scale-in").

    async with TcpPool.connect([("10.0.0.1", 9000), ("10.0.0.2", 9000)]) as pool:
        async for chunk in pool.stream("generate", {"max_tokens": 8}):
            ...

One ``TcpClient`` connection per worker address, kept up in the background: reconnected with backoff
when it is lost, and a worker that says GOAWAY (draining) takes no new streams while its running ones
finish on the same connection. Each stream goes to the least-loaded usable worker (connected, not
draining, ready by its last load report). A retryable error before the first chunk is retried on
another worker within the retry budget: the core's rule (runtime/_retry.py), the one ``NatsClient``
follows; nothing is retried once a chunk was delivered. ``update(addresses)`` follows discovery (the
addresses of a headless Service, say): new addresses are connected, removed ones take no new streams
and are closed once their last stream ended.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from runtime import IngressError, RetryBudget, Unavailable, retry_before_first_chunk
from runtime._nursery import open_background_nursery

from ._client import HEARTBEAT_TIMEOUT, ClientExchange, TcpClient
from ._protocol import HEARTBEAT_VERSION

Address = tuple[str, int]
# Waits between connection attempts to one address, doubling from the first to the last.
FIRST_RECONNECT_BACKOFF = 0.05
MAX_RECONNECT_BACKOFF = 2.0
# How long a request waits for a usable worker (all of them draining, restarting or unreachable)
# before it fails with a retryable UNAVAILABLE.
WAIT_FOR_WORKER = 10.0
# A worker turns ready (or not) in its load report, which wakes nobody: waiters look again this often,
# and a worker that reported not ready (its engine loading) is asked again this often.
RECHECK_INTERVAL = 0.25


@dataclass(eq=False)
class _Worker:
    """One address of the pool and the connection kept to it (None while reconnecting)."""

    address: Address
    client: TcpClient | None = None
    removed: bool = False
    removed_event: trio.Event = field(default_factory=trio.Event)
    last_error: str = "not connected yet"

    @property
    def usable(self) -> bool:
        if self.removed or self.client is None or not self.client.usable:
            return False
        return _reported_ready(self.client)

    def load(self) -> int:
        """Streams on this worker: ours now, plus the other callers' from its last load report."""
        assert self.client is not None
        own = self.client.open_streams
        report = self.client.load
        others = 0 if report is None else max(0, report.get("in_flight", 0) - self.client.streams_at_report)
        return own + others


def _reported_ready(client: TcpClient) -> bool:
    """Ready by the worker's last load report; a worker too old to report (protocol version 3 or
    lower) is taken as ready while connected."""
    report = client.load
    return report.get("ready", True) is True if report is not None else True


class _NoUsableWorker(Unavailable):
    """The pool waited ``wait_for_worker`` for a usable worker: retrying at once would only wait again."""


def _worth_retrying(error: IngressError) -> bool:
    return bool(error.retryable) and not isinstance(error, _NoUsableWorker)


class TcpPool:
    """Streams over many workers. Build it with ``TcpPool.connect``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        retry_budget: RetryBudget,
        wait_for_worker: float,
        connect_options: Mapping[str, Any],
    ) -> None:
        self._nursery = nursery
        self.retry_budget = retry_budget
        self._wait_for_worker = wait_for_worker
        self._connect_options = dict(connect_options)
        self._workers: dict[Address, _Worker] = {}
        self._changed = trio.Event()
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        addresses: Iterable[Address],
        *,
        retry_budget: RetryBudget | None = None,
        wait_for_worker: float = WAIT_FOR_WORKER,
        **connect_options: Any,
    ) -> AsyncIterator[TcpPool]:
        """Connect to every address in the background and serve streams for the duration of the block.
        ``connect_options`` go to each ``TcpClient.connect`` (``heartbeat_interval``, ``keepalive``, ...)."""
        async with open_background_nursery() as nursery:
            pool = cls(nursery, retry_budget or RetryBudget(), wait_for_worker, connect_options)
            pool.update(addresses)
            try:
                yield pool
            finally:
                pool._closed = True  # a stream retried after this finds no worker at once
                pool._wake()
                nursery.cancel_scope.cancel(reason="pool closed")

    def update(self, addresses: Iterable[Address]) -> None:
        """The pool's addresses from now on: new ones are connected; the others take no new streams
        and are closed once their streams have ended."""
        wanted = {(host, int(port)) for host, port in addresses}
        for address in wanted:
            known = self._workers.get(address)
            if known is None or known.removed:  # a removed one may still be finishing its streams
                worker = self._workers[address] = _Worker(address)
                self._nursery.start_soon(self._keep_connected, worker)
        for address, worker in self._workers.items():
            if address not in wanted and not worker.removed:
                worker.removed = True
                worker.removed_event.set()
        self._wake()

    async def wait_usable(self, count: int = 1) -> None:
        """Wait until at least ``count`` workers can take new streams (a router's start-up, a test)."""
        while sum(worker.usable for worker in self._workers.values()) < count:
            with trio.move_on_after(RECHECK_INTERVAL):
                await self._changed.wait()

    def workers(self) -> list[dict[str, Any]]:
        """Each address's state, for an operator or a test: connected, usable, load, last error."""
        return [
            {
                "address": f"{w.address[0]}:{w.address[1]}",
                "connected": w.client is not None,
                "usable": w.usable,
                "streams": w.client.open_streams if w.client else 0,
                "load": w.load() if w.client else None,
                "last_error": None if w.client else w.last_error,
            }
            for w in self._workers.values()
        ]

    def stream(
        self,
        endpoint: str,
        request: Any = None,
        *,
        deadline: float | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """The chunks of one request on the least-loaded worker; retried elsewhere before the first chunk."""
        request_id = request_id or uuid.uuid4().hex  # the same on every attempt: one request in the logs
        tried: set[Address] = set()
        give_up_at = trio.current_time() + self._wait_for_worker

        async def attempt(_: int) -> AsyncGenerator[Any, None]:
            client = await self._choose(tried, give_up_at)
            chunks = client.stream(
                endpoint, request, deadline=deadline, metadata=metadata, request_id=request_id
            )
            async with chunks:
                async for chunk in chunks:
                    yield chunk

        return retry_before_first_chunk(attempt, self.retry_budget, worth_retrying=_worth_retrying)

    async def call(self, endpoint: str, request: Any = None, **options: Any) -> Any:
        """Call a unary endpoint and return its one answer (retried like a stream)."""
        async with aclosing(self.stream(endpoint, request, **options)) as chunks:
            answers = [chunk async for chunk in chunks]
        if len(answers) != 1:
            raise IngressError(
                f"endpoint {endpoint!r} sent {len(answers)} chunks; use stream() for streaming endpoints"
            )
        return answers[0]

    @asynccontextmanager
    async def exchange(self, endpoint: str, **options: Any) -> AsyncIterator[ClientExchange]:
        """``async with pool.exchange(endpoint) as session``: a full-duplex exchange on the least-loaded
        worker. Not retried: an error before the first answer says whether trying again is safe (as
        with ``NatsClient``)."""
        client = await self._choose(set(), trio.current_time() + self._wait_for_worker)
        async with client.exchange(endpoint, **options) as session:
            yield session

    # ---- internals -------------------------------------------------------------------------------------

    async def _choose(self, tried: set[Address], give_up_at: float) -> TcpClient:
        """The least-loaded usable worker, one not tried yet for this request if there is one (ties
        broken at random, so that callers starting together spread out)."""
        with trio.move_on_at(give_up_at):
            while not self._closed:
                usable = [w for w in self._workers.values() if w.usable]
                fresh = [w for w in usable if w.address not in tried] or usable
                if fresh:
                    worker = min(fresh, key=lambda w: (w.load(), random.random()))
                    tried.add(worker.address)
                    assert worker.client is not None
                    return worker.client
                with trio.move_on_after(RECHECK_INTERVAL):
                    await self._changed.wait()
        if self._closed:
            raise Unavailable("the pool was closed", retryable=False)
        states = "; ".join(f"{w.address[0]}:{w.address[1]}: {self._state(w)}" for w in self._workers.values())
        raise _NoUsableWorker(
            f"no usable worker within {self._wait_for_worker:g} s ({states or 'no addresses'})",
            retryable=True,
        )

    @staticmethod
    def _state(worker: _Worker) -> str:
        if worker.removed:
            return "removed"
        if worker.client is None:
            return worker.last_error
        return "draining" if not worker.client.usable else "not ready"

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _keep_connected(self, worker: _Worker) -> None:
        backoff = FIRST_RECONNECT_BACKOFF
        while not worker.removed:
            try:
                async with TcpClient.connect(*worker.address, **self._connect_options) as client:
                    await self._first_report(client)
                    worker.client = client
                    backoff = FIRST_RECONNECT_BACKOFF
                    self._wake()
                    await self._watch(worker, client)
                    worker.last_error = "connection lost"
            except IngressError as error:
                worker.last_error = error.message
            finally:
                worker.client = None
                self._wake()
            with trio.move_on_after(backoff):
                await worker.removed_event.wait()
            backoff = min(backoff * 2, MAX_RECONNECT_BACKOFF)
        if self._workers.get(worker.address) is worker:
            del self._workers[worker.address]

    async def _first_report(self, client: TcpClient) -> None:
        """Ask a new connection's worker for its load at once (version 4): a worker that just restarted
        is still loading its model, and must not look like the least-loaded one meanwhile."""
        if client.version >= HEARTBEAT_VERSION:
            with trio.move_on_after(self._connect_options.get("heartbeat_timeout", HEARTBEAT_TIMEOUT)):
                await client.ping()

    async def _watch(self, worker: _Worker, client: TcpClient) -> None:
        """Until the connection is lost, or the address was removed and its last stream ended; wakes
        the pool's waiters when the worker says GOAWAY or turns ready."""
        async with trio.open_nursery() as watchers:
            watchers.start_soon(self._wake_after, client.wait_goaway)
            watchers.start_soon(self._retire, worker, client, watchers.cancel_scope)
            watchers.start_soon(self._follow_readiness, client)
            await client.wait_lost()
            watchers.cancel_scope.cancel()

    async def _follow_readiness(self, client: TcpClient) -> None:
        """While the worker reports not ready, ask again every RECHECK_INTERVAL (the heartbeat alone
        would notice it turning ready only at its next PING); once ready, the heartbeat keeps watch."""
        while True:
            await trio.sleep(RECHECK_INTERVAL)
            if not _reported_ready(client):
                with trio.move_on_after(RECHECK_INTERVAL * 4):
                    try:
                        await client.ping()
                    except Unavailable:
                        return  # lost: _watch sees it too
                if _reported_ready(client):
                    self._wake()

    async def _wake_after(self, event: Any) -> None:
        await event()
        self._wake()

    @staticmethod
    async def _retire(worker: _Worker, client: TcpClient, scope: trio.CancelScope) -> None:
        await worker.removed_event.wait()
        await client.wait_idle()
        scope.cancel()
