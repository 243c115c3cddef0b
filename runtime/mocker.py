"""The mock inference engine: the default app of ``ingress serve``, and the workload of tests and benchmarks.

``chat`` is a full-duplex exchange (each inbound message answered by a turn of tokens). ``generate``
streams ``max_tokens`` chunks ``{"index": i, "token": "tok<i>"}``, waiting ``ttft_ms``
before the first and ``itl_ms`` between the others, like a model's prefill and decode. ``echo`` answers
with its request. Run it with ``ingress serve runtime.mocker:worker``.

``aio_worker`` serves the same endpoints and fields through the asyncio bridge from a fake engine in
the shape of vLLM's ``AsyncLLM`` (``ingress serve runtime.mocker:aio_worker``); ``thread_worker`` from
a fake blocking engine in a thread (``generate`` comes from the fake engine; ``echo`` and ``chat`` are the
same Trio handlers, so the chaos scripts run their exchanges against every mocker). Both export the
fake's ``mocker_engine_running`` (0 when nothing is generating) and ``mocker_engine_aborted`` on
``/metrics``.

Every mocker simulates a model load at start-up: ``INGRESS_MOCKER_LOAD_S`` seconds (environment
variable, default 0) in its lifespan, so its listeners are open and ``/ready`` answers 503 (requests
are refused, retryably) for that long (docs/operations.md, "Start-up").
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import trio

from ._context import RequestContext, RuntimeContext
from ._errors import BadRequest
from ._worker import Worker

# Large enough for any benchmark here, small enough that a typo cannot pin a worker for hours.
MAX_TOKENS_LIMIT = 10_000_000
MAX_DELAY_MS = 600_000


def _int_field(request: dict[str, Any], name: str, default: int, limit: int) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise BadRequest(f"{name!r} must be an integer from 0 to {limit}, got {value!r}")
    return value


def _as_object(request: Any) -> dict[str, Any]:
    if request is None:
        return {}
    if not isinstance(request, dict):
        raise BadRequest(f"the request must be a JSON object, got {type(request).__name__}")
    return request


async def generate(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """Stream tokens with a simulated time to first token and inter-token latency."""
    fields = _as_object(request)
    max_tokens = _int_field(fields, "max_tokens", 16, MAX_TOKENS_LIMIT)
    ttft = _int_field(fields, "ttft_ms", 0, MAX_DELAY_MS) / 1000
    itl = _int_field(fields, "itl_ms", 0, MAX_DELAY_MS) / 1000
    if ttft:
        await trio.sleep(ttft)
    for index in range(max_tokens):
        if index and itl:
            await trio.sleep(itl)
        if ctx.is_stopped:
            return
        yield {"index": index, "token": f"tok{index}"}


async def chat(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """A full-duplex exchange: each message ``{"max_tokens": n, "itl_ms": t}`` (defaults 4 and 0) is
    answered by n chunks ``{"turn": k, "index": i, "token": ...}``, k counting messages from 0; once
    the caller half-closes, the exchange ends after the last turn is answered."""
    turn = 0
    async for message in messages:
        fields = _as_object(message)
        max_tokens = _int_field(fields, "max_tokens", 4, MAX_TOKENS_LIMIT)
        itl = _int_field(fields, "itl_ms", 0, MAX_DELAY_MS) / 1000
        for index in range(max_tokens):
            if index and itl:
                await trio.sleep(itl)
            yield {"turn": turn, "index": index, "token": f"tok{index}"}
        turn += 1


async def echo(request: Any, ctx: RequestContext) -> Any:
    """Answer once, with the request itself."""
    return request


LOAD_VARIABLE = "INGRESS_MOCKER_LOAD_S"


async def load_model() -> None:
    """The simulated model load: ``INGRESS_MOCKER_LOAD_S`` seconds (read now, not at import)."""
    text = os.environ.get(LOAD_VARIABLE, "0") or "0"
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{LOAD_VARIABLE} must be a number of seconds, got {text!r}") from None
    if not 0 <= seconds <= MAX_DELAY_MS / 1000:
        raise ValueError(f"{LOAD_VARIABLE} must be between 0 and {MAX_DELAY_MS // 1000} s, got {text!r}")
    await trio.sleep(seconds)


def create_mocker(name: str = "mocker", **generate_options: Any) -> Worker:
    """A fresh mocker worker; ``generate_options`` (max_concurrency, ...) apply to ``generate``."""
    worker = Worker(name)

    @worker.lifespan
    async def model(runtime: RuntimeContext) -> AsyncIterator[None]:
        await load_model()
        yield

    worker.endpoint("generate", **generate_options)(generate)
    worker.endpoint("echo")(echo)
    worker.endpoint("chat", duplex=True)(chat)
    return worker


worker = create_mocker()


# ---- the same endpoints, served by engines that are not Trio code (docs/engines.md) ----------------


def _generate_fields(request: Any) -> tuple[int, float, float]:
    fields = _as_object(request)
    max_tokens = _int_field(fields, "max_tokens", 16, MAX_TOKENS_LIMIT)
    ttft = _int_field(fields, "ttft_ms", 0, MAX_DELAY_MS) / 1000
    itl = _int_field(fields, "itl_ms", 0, MAX_DELAY_MS) / 1000
    return max_tokens, ttft, itl


# How many recent request ids a fake engine remembers (aborted, abort calls): enough for any test, and
# bounded for a mocker that runs for days.
RECENT = 1000


class FakeAsyncEngine:
    """asyncio: a fake engine in the shape of vLLM's ``AsyncLLM`` (``generate`` is an async generator
    per request id, ``abort(request_id)`` stops one). ``running`` holds the requests it is generating
    (a request leaves it only when its generator has really stopped), ``aborted`` those that stopped
    before their end, ``abort_calls`` what it was asked to abort."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.aborted: deque[str] = deque(maxlen=RECENT)
        self.aborted_total = 0
        self.abort_calls: deque[str] = deque(maxlen=RECENT)
        self.completed = 0
        self.produced = 0  # tokens generated, over all requests

    async def generate(
        self, request_id: str, max_tokens: int, ttft: float, itl: float
    ) -> AsyncIterator[dict[str, Any]]:
        import asyncio

        self.running.add(request_id)
        finished = False
        try:
            if ttft:
                await asyncio.sleep(ttft)
            for index in range(max_tokens):
                if index and itl:
                    await asyncio.sleep(itl)
                self.produced += 1
                yield {"index": index, "token": f"tok{index}"}
            finished = True
        finally:
            self.running.discard(request_id)
            if finished:
                self.completed += 1
            else:
                self.aborted.append(request_id)
                self.aborted_total += 1

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)


class FakeBlockingEngine:
    """A fake blocking engine (a C++/CUDA call in a thread): ``generate`` is a plain generator that
    sleeps between tokens, wakes early and stops when the handler is cancelled (``abort_requested``).
    ``running`` and ``aborted`` mean what they mean for ``FakeAsyncEngine``."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()  # every request's generator runs in a thread of its own
        # One thread per stream: sized for the streams a mocker serves at once (Trio's default is 40).
        self.threads = trio.CapacityLimiter(1024)
        self.running: set[str] = set()
        self.aborted: deque[str] = deque(maxlen=RECENT)
        self.aborted_total = 0
        self.completed = 0
        self.produced = 0  # tokens generated, over all requests

    def generate(self, request_id: str, max_tokens: int, ttft: float, itl: float) -> Iterator[dict[str, Any]]:
        from .engines import abort_requested, wait_for_abort

        with self._lock:
            self.running.add(request_id)
        finished = False
        try:
            if ttft and wait_for_abort(ttft):
                return
            for index in range(max_tokens):
                if (index and itl and wait_for_abort(itl)) or abort_requested():
                    return
                with self._lock:
                    self.produced += 1
                yield {"index": index, "token": f"tok{index}"}
            finished = True
        finally:
            with self._lock:
                self.running.discard(request_id)
                if finished:
                    self.completed += 1
                else:
                    self.aborted.append(request_id)
                    self.aborted_total += 1


def _export_engine(runtime: RuntimeContext, engine: FakeAsyncEngine | FakeBlockingEngine) -> None:
    """The fake's counters on the worker's /metrics: chaos scripts check that nothing runs for nobody."""
    from prometheus_client import Gauge

    registry = runtime.metrics.registry
    running = Gauge("mocker_engine_running", "Requests the fake engine is generating.", registry=registry)
    running.set_function(lambda: len(engine.running))
    aborted = Gauge(
        "mocker_engine_aborted", "Requests the fake engine stopped before their end.", registry=registry
    )
    aborted.set_function(lambda: engine.aborted_total)


async def generate_aio(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """``generate``, from the worker's ``FakeAsyncEngine`` through the asyncio bridge."""
    from .engines import aio_stream  # trio-asyncio: imported by the workers that use it

    max_tokens, ttft, itl = _generate_fields(request)
    fake: FakeAsyncEngine = ctx.state["engine"]
    tokens = fake.generate(ctx.id, max_tokens, ttft, itl)
    async with aio_stream(tokens, on_abort=lambda: fake.abort(ctx.id)) as stream:
        async for token in stream:
            yield token


async def generate_blocking(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """``generate``, from the worker's ``FakeBlockingEngine`` in a thread."""
    from .engines import thread_stream

    max_tokens, ttft, itl = _generate_fields(request)
    fake: FakeBlockingEngine = ctx.state["engine"]
    async with thread_stream(fake.generate, ctx.id, max_tokens, ttft, itl, limiter=fake.threads) as stream:
        async for token in stream:
            yield token


def _engine_mocker(
    name: str,
    make_engine: Callable[[], FakeAsyncEngine | FakeBlockingEngine],
    generate_handler: Callable[[Any, RequestContext], AsyncIterator[dict[str, Any]]],
    generate_options: dict[str, Any],
    *,
    asyncio: bool = False,
) -> Worker:
    worker = Worker(name, asyncio=asyncio)

    @worker.lifespan
    async def engine(runtime: RuntimeContext) -> AsyncIterator[dict[str, Any]]:
        await load_model()
        fake = make_engine()
        _export_engine(runtime, fake)
        yield {"engine": fake}

    worker.endpoint("generate", **generate_options)(generate_handler)
    worker.endpoint("echo")(echo)
    worker.endpoint("chat", duplex=True)(chat)
    return worker


def create_aio_mocker(name: str = "aio-mocker", **generate_options: Any) -> Worker:
    """The mocker's endpoints served through the asyncio bridge by ``FakeAsyncEngine``."""
    return _engine_mocker(name, FakeAsyncEngine, generate_aio, generate_options, asyncio=True)


def create_thread_mocker(name: str = "thread-mocker", **generate_options: Any) -> Worker:
    """The mocker's endpoints served from a thread by ``FakeBlockingEngine``."""
    return _engine_mocker(name, FakeBlockingEngine, generate_blocking, generate_options)


aio_worker = create_aio_mocker()
thread_worker = create_thread_mocker()
