"""The worker's lifespan: the engine starts before the first request, is shared by every request, and
stops after the drain; one that fails to start is exit 4 with one clear line."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from runtime import EXIT_ENGINE_FAILED, EngineStartFailed, RuntimeContext, Worker, open_worker
from runtime.testing import MemoryTransport

HERE = pathlib.Path(__file__).parent


def _worker(events: list[str]) -> Worker:
    worker = Worker("life")

    @worker.lifespan
    async def engine(runtime: RuntimeContext) -> AsyncIterator[dict[str, Any]]:
        events.append("start")
        yield {"engine": "the-engine", "runtime": runtime.worker_name}
        events.append("stop")

    @worker.endpoint("which")
    async def which(request: Any, ctx: Any) -> Any:
        events.append(f"request sees {ctx.state['engine']}")
        await trio.sleep(request)
        return ctx.state["runtime"]

    return worker


async def test_the_lifespan_state_reaches_handlers_and_stops_after_the_drain(autojump_clock):
    """start before any request; ctx.state is what it yielded; stop after phase 2, before phase 3."""
    events: list[str] = []
    memory = MemoryTransport()
    with capture_logs() as logs:
        async with open_worker(_worker(events), [memory]) as handle:
            call = memory.open("which", b"5")
            await trio.sleep(1)
            handle.shutdown("test")
            await call.wait_done()
            await handle.wait_drained()
    assert events == ["start", "request sees the-engine", "stop"]
    assert call.sink.chunks == ["life"]
    order = [e["event"] for e in logs if e["event"] in ("shutdown.phase2.done", "worker.engine_stopped")]
    assert order == ["shutdown.phase2.done", "worker.engine_stopped"]


async def test_a_lifespan_that_fails_to_start_stops_the_worker_before_it_serves():
    """An exception before the yield is EngineStartFailed naming the cause; no transport started."""
    from engine_apps import failing  # tests/ is on sys.path (rootdir conftest)

    with pytest.raises(EngineStartFailed, match="model weights not found"):
        async with open_worker(failing, [MemoryTransport()]):
            raise AssertionError("the worker served with an engine that never started")


def test_a_lifespan_must_be_an_async_generator():
    """A plain coroutine function as a lifespan is refused where it is registered."""
    worker = Worker("x")

    async def not_a_generator(runtime: RuntimeContext) -> None:
        return None

    with pytest.raises(TypeError, match="async generator"):
        worker.lifespan(not_a_generator)  # type: ignore[arg-type]


def test_ingress_serve_exits_4_when_the_engine_fails_to_start():
    """`ingress serve` with an engine that cannot start: exit 4 and the cause in one log line."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            "serve",
            "engine_apps:failing",
            "--tcp",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == EXIT_ENGINE_FAILED
    failed = [line for line in result.stdout.splitlines() if "worker.startup_failed" in line]
    assert len(failed) == 1 and "model weights not found" in failed[0] and "Traceback" not in result.stdout


async def test_a_lifespan_that_yields_something_else_than_a_mapping_fails_the_start_up_and_is_stopped():
    """Yielding the engine itself (not {"name": engine}) is EngineStartFailed; its stop still runs."""
    worker, stopped = Worker("odd"), []

    @worker.lifespan
    async def engine(runtime: RuntimeContext) -> AsyncIterator[Any]:
        yield object()
        stopped.append(True)

    @worker.endpoint("echo")
    async def echo(request: Any, ctx: Any) -> Any:
        return request

    with pytest.raises(EngineStartFailed, match="yields a mapping"):
        async with open_worker(worker, [MemoryTransport()]):
            raise AssertionError("served")
    assert stopped == [True]


async def test_the_lifespan_stop_can_await_even_when_the_worker_is_cancelled_from_outside():
    """Cancelled from outside (no drain): the code after the yield still runs its awaits."""
    events: list[str] = []
    worker = Worker("cancelled")

    @worker.lifespan
    async def engine(runtime: RuntimeContext) -> AsyncIterator[dict[str, Any]]:
        yield {}
        await trio.lowlevel.checkpoint()  # would raise Cancelled at once without the shield
        events.append("stopped cleanly")

    @worker.endpoint("echo")
    async def echo(request: Any, ctx: Any) -> Any:
        return request

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: worker.serve(
                    [MemoryTransport()], handle_signals=False, task_status=task_status
                )
            )
            scope.cancel()
    assert events == ["stopped cleanly"]
