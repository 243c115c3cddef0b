"""Workers whose engine is not Trio code, over real TCP sockets: the asyncio mocker (through the bridge)
and the thread mocker. A caller that leaves aborts the engine's request; a drain lets engine streams
finish; a forced drain aborts them; engine errors reach the caller; a slow caller holds the engine back."""

from __future__ import annotations

import math
import pathlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio

from runtime import ErrorCode, RemoteError, RuntimeContext, Worker, WorkerConfig, open_worker
from runtime.engines import aio_stream
from runtime.mocker import FakeAsyncEngine, create_aio_mocker, create_thread_mocker
from runtime.testing import sample
from transports.tcp import TcpClient, TcpTransport
from transports.tcp import _protocol as codec

MOCKERS = {"asyncio": create_aio_mocker, "thread": create_thread_mocker}
TEST_TIMEOUT = 20


@asynccontextmanager
async def serving(make: Callable[[], Worker], **config: Any) -> AsyncIterator[tuple[Any, TcpClient, Any]]:
    async with (
        open_worker(make(), [TcpTransport(port=0)], WorkerConfig(**config)) as handle,
        TcpClient.connect(*handle.addresses["tcp"]) as client,
    ):
        yield handle, client, handle.runtime.state.get("engine")


async def _idle(handle: Any) -> None:
    await handle.binding("tcp", "generate").tracker.wait_idle()


@pytest.mark.parametrize("kind", MOCKERS)
async def test_a_caller_that_leaves_mid_stream_aborts_the_engines_request(kind):
    """Leaving the stream (KILL) cancels the handler and the engine's request: recorded as aborted."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(MOCKERS[kind]) as (handle, client, engine):
            stream = client.stream(
                "generate", {"max_tokens": 100_000, "itl_ms": 5}, request_id="leaver", deadline=math.inf
            )
            async with stream:
                async for chunk in stream:
                    if chunk["index"] == 2:
                        break
            await _idle(handle)
            assert list(engine.aborted) == ["leaver"] and engine.running == set()
            if kind == "asyncio":
                assert list(engine.abort_calls) == ["leaver"]  # the handler's on_abort hook ran
            assert sample(handle.runtime, "mocker_engine_running") == 0


@pytest.mark.parametrize("kind", MOCKERS)
async def test_a_drain_lets_engine_streams_finish(kind):
    """SIGTERM (shutdown) mid-stream: the engine's stream runs to its end; nothing is aborted."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(MOCKERS[kind]) as (handle, client, engine):
            stream = client.stream("generate", {"max_tokens": 20, "itl_ms": 5}, deadline=math.inf)
            chunks = []
            async with stream:
                async for chunk in stream:
                    chunks.append(chunk)
                    if len(chunks) == 1:
                        handle.shutdown("test")
            result = await handle.wait_drained()
    assert len(chunks) == 20 and not result.forced
    assert engine.completed == 1 and not engine.aborted


@pytest.mark.parametrize("kind", MOCKERS)
async def test_a_forced_drain_aborts_the_engines_requests(kind):
    """The drain deadline passes: the caller hears SHUTTING_DOWN and the engine request is aborted."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(MOCKERS[kind], drain_timeout=0.2) as (handle, client, engine):
            stream = client.stream(
                "generate", {"max_tokens": 1000, "itl_ms": 1000}, request_id="slow", deadline=math.inf
            )

            async def read_and_shut_down() -> None:
                async with stream:
                    async for _ in stream:
                        handle.shutdown("test")

            with pytest.raises(RemoteError) as ended:
                await read_and_shut_down()
            result = await handle.wait_drained()
    assert ended.value.code is ErrorCode.SHUTTING_DOWN and result.forced
    assert list(engine.aborted) == ["slow"] and engine.running == set()


def _failing_engine_worker() -> Worker:
    """An asyncio engine that fails after two tokens, as an engine does when its GPU goes away."""
    worker = Worker("failing", asyncio=True)

    class Engine:
        async def generate(self) -> AsyncIterator[int]:
            yield 0
            yield 1
            raise RuntimeError("CUDA error: device-side assert triggered")

    @worker.lifespan
    async def engine(runtime: RuntimeContext) -> AsyncIterator[dict[str, Any]]:
        yield {"engine": Engine()}

    @worker.endpoint("generate")
    async def generate(request: Any, ctx: Any) -> AsyncIterator[int]:
        async with aio_stream(ctx.state["engine"].generate()) as tokens:
            async for token in tokens:
                yield token

    return worker


async def test_an_engine_error_reaches_the_caller_as_internal_with_its_message():
    """The engine's exception mid-stream: the caller gets its chunks, then INTERNAL naming the error."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_failing_engine_worker) as (_, client, _engine):
            chunks: list[int] = []

            async def read() -> None:
                async for chunk in client.stream("generate", {}, deadline=math.inf):
                    chunks.append(chunk)

            with pytest.raises(RemoteError) as failed:
                await read()
    assert chunks == [0, 1] and failed.value.code is ErrorCode.INTERNAL
    assert "device-side assert" in failed.value.message and failed.value.retryable is False


@pytest.mark.parametrize("kind", MOCKERS)
async def test_a_caller_that_stops_reading_holds_the_engine_back(kind):
    """A raw client asks for ten million tokens and reads none: the engine stops, bounded, far short."""
    total = 10_000_000
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(MOCKERS[kind]) as (handle, _, engine):
            stream = await trio.open_tcp_stream(*handle.addresses["tcp"])
            connection = codec.Connection(codec.Role.CLIENT)
            request = codec.Request(1, "generate", "stuck", 0, (), b'{"max_tokens": %d}' % total)
            await stream.send_all(connection.send(connection.local_hello))
            while connection.peer_hello is None:
                connection.receive_data(await stream.receive_some())
                connection.next_event()
            await stream.send_all(connection.send(request))
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            held_at = engine.produced
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert 0 < held_at == engine.produced < total  # stopped, not merely slow
            await stream.aclose()
            await _idle(handle)
            assert engine.running == set() and list(engine.aborted) == ["stuck"]


def _documented_worker() -> Worker:
    """The complete vLLM-shaped worker of docs/engines.md, run exactly as written there."""
    text = (pathlib.Path(__file__).parent.parent / "docs" / "engines.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "documented_app"}
    exec(compile(code, "docs/engines.md", "exec"), namespace)
    return namespace["worker"]


async def test_the_documented_vllm_shaped_worker_streams_and_aborts_a_caller_that_leaves():
    """docs/engines.md's example: a full stream works, and a caller that leaves is in llm.aborted."""
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(_documented_worker) as (handle, client, _):
            llm = handle.runtime.state["llm"]
            full = [
                c
                async for c in client.stream("generate", {"prompt": "hi", "max_tokens": 3}, deadline=math.inf)
            ]
            stream = client.stream(
                "generate", {"prompt": "hi", "max_tokens": 1000}, request_id="gone", deadline=math.inf
            )
            async with stream:
                async for _ in stream:
                    break
            await _idle(handle)
    assert full == [{"text": "tok0"}, {"text": "tok1"}, {"text": "tok2"}]
    assert llm.aborted == ["gone"]


def _nats_engine_worker() -> Worker:
    """An asyncio engine behind NATS: the lifespan notes the worker's loop, a handler reports its own."""
    worker = Worker("nats-engine", asyncio=True)

    @worker.lifespan
    async def engine(runtime: RuntimeContext) -> AsyncIterator[dict[str, Any]]:
        yield {"engine": FakeAsyncEngine(), "loop": trio_asyncio.current_loop.get()}

    @worker.endpoint("generate")
    async def generate(request: Any, ctx: Any) -> AsyncIterator[dict[str, Any]]:
        fake = ctx.state["engine"]
        async with aio_stream(
            fake.generate(ctx.id, request["n"], 0, 0.005), on_abort=lambda: fake.abort(ctx.id)
        ) as s:
            async for token in s:
                yield token

    @worker.endpoint("same_loop")
    async def same_loop(request: Any, ctx: Any) -> bool:
        return trio_asyncio.current_loop.get() is ctx.state["loop"]  # NATS's request task's loop

    return worker


async def test_nats_and_an_asyncio_engine_share_the_workers_loop_and_leaving_aborts_the_engine():
    """NATS (asyncio inside) and the engine bridge in one worker: one loop; leaving aborts the engine."""
    from runtime.testing import nats_server
    from transports.nats import NatsClient, NatsTransport

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            nats_server() as url,
            open_worker(_nats_engine_worker(), [NatsTransport(url, namespace="engines")]) as handle,
            NatsClient.connect(url, namespace="engines") as client,
        ):
            engine = handle.runtime.state["engine"]
            assert await client.call("same_loop", {}) is True
            full = [c async for c in client.stream("generate", {"n": 3}, deadline=math.inf)]
            stream = client.stream("generate", {"n": 100_000}, request_id="gone", deadline=math.inf)
            async with aclosing(stream):
                async for _ in stream:
                    break
            await handle.binding("nats", "generate").tracker.wait_idle()
    assert [c["index"] for c in full] == [0, 1, 2]
    assert list(engine.aborted) == ["gone"] and list(engine.abort_calls) == ["gone"] and not engine.running


@pytest.mark.parametrize("kind", MOCKERS)
async def test_a_forced_drain_with_a_client_that_reads_nothing_still_stops_the_engine_and_exits(kind):
    """The killed request is stuck writing to a client that reads nothing: the engine stops anyway
    (its work was aborted) and phase 3 comes, instead of waiting engine_stop_timeout for that write."""
    with trio.fail_after(TEST_TIMEOUT):  # engine_stop_timeout is 60 s: waiting on the write would fail here
        async with serving(MOCKERS[kind], drain_timeout=0.2, engine_stop_timeout=60) as (handle, _, engine):
            stream = await trio.open_tcp_stream(*handle.addresses["tcp"])
            connection = codec.Connection(codec.Role.CLIENT)
            await stream.send_all(connection.send(connection.local_hello))
            while connection.peer_hello is None:
                connection.receive_data(await stream.receive_some())
                connection.next_event()
            request = codec.Request(1, "generate", "deaf", 0, (), b'{"max_tokens": 10000000}')
            await stream.send_all(connection.send(request))
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            handle.shutdown("test")
            result = await handle.wait_drained()
        await stream.aclose()
    assert result.forced and list(engine.aborted) == ["deaf"] and engine.running == set()
