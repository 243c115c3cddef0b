"""Engines that are not Trio code (runtime.engines): asyncio through the worker's loop, blocking code in
threads; results, errors, batching, back-pressure and cancellation both ways."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial

import pytest
import trio
import trio.testing
import trio_asyncio
from structlog.testing import capture_logs

from runtime import ErrorCode, IngressError, Overloaded, Unavailable, engines
from runtime.engines import (
    DEFAULT_MAX_BATCH,
    EngineError,
    abort_requested,
    aio_call,
    aio_stream,
    open_asyncio_loop,
    open_worker_loop,
    thread_call,
    thread_stream,
    wait_for_abort,
)


class AsyncEngine:
    """asyncio: records what it produced, whether its generator was closed, and what was aborted."""

    def __init__(self) -> None:
        self.produced = 0
        self.finally_ran = 0
        self.aborted: list[str] = []
        self.cancelled_calls = 0

    async def answer(self, value: object, *, fail: BaseException | None = None) -> object:
        await asyncio.sleep(0)
        if fail is not None:
            raise fail
        return value

    async def hang(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled_calls += 1
            raise

    async def tokens(
        self, count: int, *, fail_at: int | None = None, paced: bool = True
    ) -> AsyncIterator[int]:
        """``paced``: one loop turn per item; else the items are ready at once (a decode step's burst)."""
        try:
            for i in range(count):
                if i == fail_at:
                    raise KeyError("the KV cache is full")
                if paced:
                    await asyncio.sleep(0)
                self.produced += 1
                yield i
        finally:
            self.finally_ran += 1

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(0)
        self.aborted.append(request_id)


async def test_aio_call_returns_and_maps_engine_errors():
    """A value comes back; an engine exception is INTERNAL with its message; an IngressError passes."""
    engine = AsyncEngine()
    async with open_worker_loop():
        assert await aio_call(engine.answer, {"ok": 1}) == {"ok": 1}
        with pytest.raises(EngineError, match="ValueError: weights not loaded") as failed:
            await aio_call(engine.answer, None, fail=ValueError("weights not loaded"))
        assert failed.value.code is ErrorCode.INTERNAL
        with pytest.raises(Overloaded):
            await aio_call(engine.answer, None, fail=Overloaded("batch full"))


async def test_a_cancelled_handler_cancels_the_asyncio_task_and_waits_for_it():
    """Cancelling the Trio side cancels the asyncio coroutine, which has seen it before the call returns."""
    engine = AsyncEngine()
    async with open_worker_loop():
        with trio.move_on_after(0.05):
            await aio_call(engine.hang)
        assert engine.cancelled_calls == 1


async def test_without_the_workers_loop_the_error_says_what_to_do():
    """Calling an asyncio engine from a worker without asyncio=True is a clear RuntimeError."""
    with pytest.raises(RuntimeError, match="asyncio=True"):
        await aio_call(AsyncEngine().answer, 1)


async def test_aio_stream_crosses_once_per_batch_not_per_item():
    """An engine with 1,000 items ready delivers them in order in about 1000 / max_batch crossings."""
    engine = AsyncEngine()
    async with open_worker_loop(), aio_stream(engine.tokens(1000, paced=False)) as items:
        received = [item async for item in items]
        crossings = items.waits
    assert received == list(range(1000)) and engine.finally_ran == 1
    assert crossings <= 1000 // DEFAULT_MAX_BATCH + 2


async def test_a_slow_consumer_holds_the_asyncio_engine_back():
    """Nothing read after the first item: the engine stops within max_batch items of the reader."""
    engine = AsyncEngine()
    async with open_worker_loop(), aio_stream(engine.tokens(100_000), max_batch=8) as items:
        assert await items.__anext__() == 0
        await trio.testing.wait_all_tasks_blocked()
        assert engine.produced <= 1 + 2 * 8  # the batch in hand, and a full buffer behind it


async def test_leaving_an_aio_stream_early_cancels_the_engine_and_runs_on_abort():
    """A handler cancelled mid-stream: the engine's generator is closed and on_abort runs, once."""
    engine = AsyncEngine()
    async with open_worker_loop():
        with trio.CancelScope() as scope:
            async with aio_stream(engine.tokens(100_000), on_abort=lambda: engine.abort("r1")) as items:
                async for item in items:
                    if item == 3:
                        scope.cancel()
                        await trio.lowlevel.checkpoint()
    assert engine.aborted == ["r1"] and engine.finally_ran == 1


async def test_an_engine_that_ends_normally_is_not_aborted():
    """on_abort is only for streams the handler left early."""
    engine = AsyncEngine()
    async with (
        open_worker_loop(),
        aio_stream(engine.tokens(3), on_abort=lambda: engine.abort("r1")) as items,
    ):
        assert [item async for item in items] == [0, 1, 2]
    assert engine.aborted == []


async def test_an_engine_error_mid_stream_arrives_after_the_items_before_it():
    """Items before the failure are delivered, then EngineError (INTERNAL) with the engine's message."""
    engine = AsyncEngine()
    received: list[int] = []

    async def consume() -> None:
        async with aio_stream(engine.tokens(10, fail_at=4)) as items:
            async for item in items:
                received.append(item)

    async with open_worker_loop():
        with pytest.raises(EngineError, match="KV cache is full"):
            await consume()
    assert received == [0, 1, 2, 3]


def _blocking_answer(value: object, fail: BaseException | None = None) -> object:
    if fail is not None:
        raise fail
    return value


async def test_thread_call_returns_and_maps_errors():
    """A blocking call's value comes back; its exception is INTERNAL with its message."""
    assert await thread_call(_blocking_answer, 7) == 7
    with pytest.raises(EngineError, match="OSError: device lost") as failed:
        await thread_call(_blocking_answer, None, OSError("device lost"))
    assert isinstance(failed.value, IngressError) and failed.value.code is ErrorCode.INTERNAL


async def test_a_cancelled_thread_call_sets_the_abort_flag_and_waits_for_the_thread():
    """The blocking code sees abort_requested() and returns; the cancelled call waits for it."""
    seen: list[str] = []
    entered = threading.Event()

    def work() -> None:
        entered.set()
        while not wait_for_abort(0.01):
            pass
        seen.append("aborted" if abort_requested() else "not aborted")

    with trio.move_on_after(0.05):
        await thread_call(work)
    assert entered.is_set() and seen == ["aborted"]  # the thread had finished when the call returned


class BlockingEngine:
    def __init__(self) -> None:
        self.produced = 0
        self.closed = 0

    def tokens(self, count: int, fail_at: int | None = None) -> Iterator[int]:
        try:
            for i in range(count):
                if i == fail_at:
                    raise RuntimeError("CUDA error: out of memory")
                self.produced += 1
                yield i
        finally:
            self.closed += 1


async def test_thread_stream_delivers_in_order_and_holds_the_thread_back():
    """Every item in order; a reader that stops leaves the producer within max_batch of it."""
    engine = BlockingEngine()
    async with thread_stream(engine.tokens, 500) as items:
        assert [item async for item in items] == list(range(500))
    engine = BlockingEngine()
    async with thread_stream(engine.tokens, 100_000, max_batch=8) as items:
        assert await items.__anext__() == 0
        assert await trio.to_thread.run_sync(items.held_back.wait, 10)  # the producer waits for room
        assert engine.produced <= 1 + 8 + 1  # the item taken, a full buffer, one in the producer's hand
    assert engine.closed == 1  # leaving early closed the generator in its thread


async def test_thread_stream_errors_arrive_after_the_items_before_them():
    """A blocking engine's failure arrives as EngineError after what it produced."""
    engine = BlockingEngine()
    received: list[int] = []

    async def consume() -> None:
        async with thread_stream(engine.tokens, 10, 5) as items:
            async for item in items:
                received.append(item)

    with pytest.raises(EngineError, match="out of memory"):
        await consume()
    assert received == [0, 1, 2, 3, 4] and engine.closed == 1


async def test_an_engine_that_cancels_on_its_own_is_unavailable_not_a_hang():
    """asyncio-side cancellation nobody on the Trio side asked for: UNAVAILABLE, in a call or a stream."""

    async def engine_gives_up() -> None:
        raise asyncio.CancelledError

    async def stream_then_give_up() -> AsyncIterator[int]:
        yield 0
        raise asyncio.CancelledError

    async def consume() -> list[int]:
        async with aio_stream(stream_then_give_up()) as items:
            return [item async for item in items]

    async with open_worker_loop():
        with trio.fail_after(10):
            with pytest.raises(Unavailable, match="engine cancelled"):
                await aio_call(engine_gives_up)
            with pytest.raises(Unavailable, match="engine cancelled"):
                await consume()


async def test_an_engine_that_ignores_cancellation_is_left_behind_after_abort_timeout(monkeypatch):
    """A cancelled call waits ABORT_TIMEOUT for an engine that will not stop, then leaves it (logged)."""
    monkeypatch.setattr(engines, "ABORT_TIMEOUT", 0.2)
    stubborn = asyncio.Event()

    async def ignores_cancellation() -> None:
        while not stubborn.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # a badly behaved engine

    async with open_worker_loop():
        with capture_logs() as logs, trio.fail_after(5):
            with trio.move_on_after(0.05):
                await aio_call(ignores_cancellation)
            stubborn.set()
    assert [e["event"] for e in logs] == ["engine.abandoned"]


async def test_a_cancelled_thread_call_whose_function_raises_on_abort_is_just_cancelled():
    """Blocking code that raises when it sees the flag: the handler gets its cancellation, not a group."""
    entered = threading.Event()

    def raises_on_abort() -> None:
        entered.set()
        while not wait_for_abort(0.01):
            pass
        raise RuntimeError("aborted by flag")

    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            await thread_call(raises_on_abort)
    assert scope.cancelled_caught and entered.is_set()


async def test_a_call_queued_for_a_thread_leaves_at_once_when_cancelled_and_never_runs():
    """With the limiter full, a cancelled call does not wait for a thread, and its function never runs."""
    limiter = trio.CapacityLimiter(1)
    release, ran = threading.Event(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: thread_call(release.wait, limiter=limiter))
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5), trio.move_on_after(0.05):
            await thread_call(ran.append, "queued", limiter=limiter)
        assert ran == []  # left while the other call still holds the only thread
        release.set()
    assert ran == []


async def _write_after_abort(port: int) -> bool:
    """asyncio: connect, lose the connection (``abort``), then write with ``writelines`` at once, as
    nats-py's flusher does when a server goes away; True if the transport says its connection is lost."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.abort()
    writer.transport.writelines([b"written after the connection was lost"])
    return writer.transport.is_closing()


async def test_writelines_after_a_lost_connection_leaves_the_asyncio_loop_running():
    """CPython 3.12/3.13.0 ``writelines`` on a lost connection (gh-136234) no longer ends the loop."""

    async def accept_and_wait(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, accept_and_wait, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_asyncio_loop():
            # Whether the socket is closed before the stray writer first waits is a race: try often.
            for _ in range(20):
                assert await trio_asyncio.aio_as_trio(_write_after_abort)(port)
                await trio.testing.wait_all_tasks_blocked()  # a writer on the closed socket fails here
            assert await trio_asyncio.aio_as_trio(asyncio.sleep)(0, result="alive") == "alive"
        nursery.cancel_scope.cancel()
