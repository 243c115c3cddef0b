"""Engines that are not Trio code, called from handlers: asyncio engines through the worker's one asyncio
loop (trio-asyncio), blocking engines in threads. See docs/engines.md.

The guarantees a handler has stop nowhere on the way: a handler cancelled for any reason (caller gone,
kill, deadline, inactivity, forced drain) cancels the engine's side at once and waits, for at most
``ABORT_TIMEOUT``, until it has finished cancelling, so the engine's own cleanup (an
``engine.abort(request_id)``) has run before the request counts as done; an engine that does not stop
in that time is left behind (logged), never waited on forever. An error on the engine's side arrives in
the handler as an ``IngressError`` (``EngineError``, INTERNAL with the engine's message, unless the
engine raised an ``IngressError`` itself), never as a hang; and a slow caller slows the engine instead
of buffering its output, because at most ``max_batch`` items wait on the engine's side of the bridge.

asyncio:
    ``await aio_call(fn, *args)``; ``async with aio_stream(engine.generate(...), on_abort=...) as
    tokens: async for token in tokens: ...`` crosses once per batch of items that are ready, not per item.
threads:
    ``await thread_call(blocking_fn, *args)``; ``async with thread_stream(blocking_generator_fn, *args)``;
    blocking code polls ``abort_requested()`` between steps and returns early when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio

from ._asyncio_guard import drop_writers_for_lost_connections
from ._errors import IngressError, InternalError, Unavailable, describe
from ._inflight import current_engine_work
from ._logging import get_logger
from ._nursery import open_background_nursery, unwrap_body_error

T = TypeVar("T")

# Items an engine may have produced that the handler has not taken yet (per stream): the bound that makes
# a slow caller hold the engine back. Also the most items one crossing of the bridge carries.
DEFAULT_MAX_BATCH = 64
# After a handler is cancelled: how long its engine work (an asyncio task's cancellation, an abort
# hook, a thread that polls its abort flag) may take to stop before it is left behind. A hung engine
# must not hold a request, and so the drain and the process's exit, forever.
ABORT_TIMEOUT = 5.0
# When the worker exits: how long the asyncio tasks left on its loop (an engine's background tasks) may
# take to finish being cancelled before the loop is left behind.
LOOP_CLOSE_TIMEOUT = 5.0

_log = get_logger(component="engines")


class EngineError(InternalError):
    """The engine failed: the caller gets INTERNAL with the engine's message (engines' messages are
    meant for their users, unlike a handler's own exceptions, whose text stays in the log)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"engine error: {type(cause).__name__}: {describe(cause)}")


def _engine_error(exc: BaseException) -> IngressError:
    """What a handler gets for an exception on the engine's side (logged, with its traceback)."""
    if isinstance(exc, IngressError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        # The engine cancelled the request itself (it is shutting down, say): nothing was asked of it.
        return Unavailable("the engine cancelled the request")
    _log.error("engine.failed", error=describe(exc), exc_info=exc)
    return EngineError(exc)


@contextlib.contextmanager
def _engine_work() -> Iterator[None]:
    """Count an engine call or stream (its abort included) as the worker's engine work: the lifespan
    stops the engine only once none is left."""
    work = current_engine_work.get()
    if work is None:  # used outside a worker (a test, a script)
        yield
        return
    with work.track():
        yield


def _check_batch(max_batch: int) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")


# ---- the worker's asyncio loop --------------------------------------------------------------------

# The loop of the worker that asked for one (Worker(asyncio=True)), for handlers. Not trio-asyncio's own
# current loop: a NATS transport without it opens a private loop, and a handler must not find that one
# on NATS requests only.
_worker_loop: contextvars.ContextVar[trio_asyncio.TrioEventLoop | None] = contextvars.ContextVar(
    "ingress_worker_loop", default=None
)


@asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """The asyncio loop of this Trio task's context: the one already open (the worker's, shared by the
    NATS transport and handlers) or, if there is none, a new one for the duration of the block."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        yield loop
        return
    async with unwrap_body_error(trio_asyncio.open_loop()) as loop:
        drop_writers_for_lost_connections(loop)
        yield loop


@asynccontextmanager
async def open_worker_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """The worker's own loop, around everything it runs. Closing it cancels the asyncio tasks still
    there (an engine's background tasks): that may take ``LOOP_CLOSE_TIMEOUT`` at most, and what fails
    or hangs in it is logged, never turned into the worker's exit status."""
    close_timeout = LOOP_CLOSE_TIMEOUT
    with trio.CancelScope() as closing:
        body_done = False
        try:
            async with open_asyncio_loop() as loop:
                token = _worker_loop.set(loop)
                try:
                    yield loop
                    body_done = True
                finally:
                    _worker_loop.reset(token)
                    closing.deadline = trio.current_time() + close_timeout
        except Exception as exc:
            if not body_done:
                raise
            _log.warning("worker.asyncio_close_failed", error=describe(exc))
    if closing.cancelled_caught:
        _log.warning("worker.asyncio_close_timed_out", close_timeout=close_timeout)


def _loop() -> trio_asyncio.TrioEventLoop:
    loop = _worker_loop.get()
    if loop is None:
        raise RuntimeError(
            "no asyncio loop: create the worker with Worker(name, asyncio=True) to call asyncio engines"
        )
    return loop


async def _run_task(loop: trio_asyncio.TrioEventLoop, coroutine: Coroutine[Any, Any, T], what: str) -> T:
    """Trio: run ``coroutine`` as an asyncio task on ``loop`` and return its result. If this is cancelled,
    the task is cancelled and waited on for ``ABORT_TIMEOUT`` at most, then left behind (logged)."""
    done = trio.Event()
    task = loop.create_task(coroutine)
    task.add_done_callback(lambda _: done.set())  # a plain call from asyncio into Trio: same thread
    try:
        await done.wait()
    except trio.Cancelled:
        task.cancel()
        with trio.move_on_after(ABORT_TIMEOUT, shield=True):
            await done.wait()
        if not done.is_set():
            _log.warning("engine.abandoned", what=what, abort_timeout=ABORT_TIMEOUT)
        raise
    result: T = task.result()
    return result


async def aio_call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Trio: await the asyncio coroutine function ``fn(*args, **kwargs)`` on the worker's loop.

    If the handler is cancelled, the asyncio task is cancelled and this waits until it has finished
    cancelling (``ABORT_TIMEOUT`` at most); an exception on the asyncio side arrives as ``EngineError``
    (or as itself, for an ``IngressError``), an asyncio-side cancellation the handler did not ask for
    as UNAVAILABLE."""
    loop = _loop()

    async def call() -> T:
        return await fn(*args, **kwargs)

    try:
        with _engine_work():
            return await _run_task(loop, call(), getattr(fn, "__qualname__", repr(fn)))
    except trio.Cancelled:
        raise
    except (Exception, asyncio.CancelledError) as exc:
        raise _engine_error(exc) from exc


@asynccontextmanager
async def aio_stream(
    items: AsyncIterator[T],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    on_abort: Callable[[], Any] | None = None,
) -> AsyncIterator[AsyncIterator[T]]:
    """Trio: iterate an asyncio async iterator (``engine.generate(...)``) as a Trio one.

    An asyncio task pulls items into a buffer of at most ``max_batch``; the handler takes them without
    a crossing per item, and waits (one wake-up) only when none is ready. If the block is left before
    the engine's iterator ended (the handler was cancelled, or stopped early), the task is cancelled
    (the engine's generator sees ``CancelledError`` at its ``await``), awaited, and then
    ``on_abort()`` runs on the loop (an asyncio coroutine function or a plain one): the documented
    place for ``engine.abort(request_id)``. All of it is bounded by
    ``ABORT_TIMEOUT``; a failure in it is logged, and the handler's own outcome stands."""
    _check_batch(max_batch)
    loop = _loop()
    pump = _AioPump(items, max_batch)
    with _engine_work():
        try:
            pump.start(loop)
            yield pump
        finally:
            if not pump.finished:
                with trio.CancelScope(shield=True):
                    await _abort_pump(loop, pump, on_abort)


async def _abort_pump(
    loop: trio_asyncio.TrioEventLoop, pump: _AioPump, on_abort: Callable[[], Any] | None
) -> None:
    """Trio, shielded: run ``pump.abort`` for ``ABORT_TIMEOUT`` at most; log whatever goes wrong."""
    with trio.move_on_after(ABORT_TIMEOUT) as waited:
        try:
            await _run_task(loop, pump.abort(on_abort), "abort")
        except Exception as exc:
            _log.warning("engine.abort_failed", error=describe(exc), exc_info=exc)
    if waited.cancelled_caught:
        _log.warning("engine.abandoned", what="abort", abort_timeout=ABORT_TIMEOUT)


class _AioPump:
    """The bridge of one stream. An asyncio task pulls the engine's items into a buffer of at most
    ``max_batch``; the handler's side takes them, with no crossing of the bridge per item: both sides
    run in one thread, so each wakes the other with a plain call (a ``trio.Event`` set from asyncio,
    an ``asyncio.Event`` set from Trio), and the handler only waits when the buffer is empty."""

    def __init__(self, items: AsyncIterator[Any], max_batch: int) -> None:
        self.items = items
        self.max_batch = max_batch
        self.buffer: deque[Any] = deque()
        self.finished = False  # the engine's iterator ended, cleanly or with an error
        self.error: BaseException | None = None
        self.task: asyncio.Future[None] | None = None
        self.room = asyncio.Event()  # the buffer has room (set from Trio, waited on in asyncio)
        self.room.set()
        self.waiter: trio.Event | None = None  # set while the handler waits for items
        self.waits = 0  # how often the handler had to wait: one wake-up per batch (observable)

    def start(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self.task = loop.create_task(self._run())

    # asyncio side

    async def _run(self) -> None:
        try:
            async for item in self.items:
                self.buffer.append(item)
                self._wake_handler()
                if len(self.buffer) >= self.max_batch:
                    self.room.clear()
                    await self.room.wait()
            self.finished = True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                self.error, self.finished = asyncio.CancelledError(), True  # the engine's own doing
            raise
        except BaseException as exc:  # anything else the engine raised ends the stream with it
            self.error, self.finished = exc, True
            if not isinstance(exc, Exception):
                raise
        finally:
            self._wake_handler()

    def _wake_handler(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set()

    async def abort(self, on_abort: Callable[[], Any] | None) -> None:
        if self.finished:
            return  # it ended on its own meanwhile: there is nothing to abort
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the abort itself is being cancelled (ABORT_TIMEOUT): stop here
            except Exception as exc:  # raised on its way out: the engine's own business, logged
                _log.warning("engine.abort_failed", error=describe(exc))
        aclose = getattr(self.items, "aclose", None)
        if aclose is not None:
            await aclose()
        if on_abort is not None:
            result = on_abort()
            if inspect.isawaitable(result):
                await result

    # Trio side: the handler's async iterator

    def __aiter__(self) -> _AioPump:
        return self

    async def __anext__(self) -> Any:
        while not self.buffer:
            if self.finished:
                if self.error is not None:
                    raise _engine_error(self.error) from self.error
                raise StopAsyncIteration
            self.waiter = trio.Event()
            self.waits += 1
            await self.waiter.wait()
        item = self.buffer.popleft()
        if not self.room.is_set() and len(self.buffer) < self.max_batch:
            self.room.set()
        return item


# ---- threads --------------------------------------------------------------------------------------

_abort: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("ingress_abort", default=None)


def abort_requested() -> bool:
    """In blocking code run by ``thread_call``/``thread_stream``: whether the handler was cancelled.
    The code checks it between steps and returns (or raises) early; the request waits for it."""
    flag = _abort.get()
    return flag is not None and flag.is_set()


def wait_for_abort(seconds: float) -> bool:
    """In blocking code: sleep ``seconds``, waking early if the handler is cancelled; True if it was."""
    flag = _abort.get()
    if flag is None:
        time.sleep(seconds)
        return False
    return flag.wait(seconds)


class _Thread:
    """One blocking function in a thread of ``limiter``, with its abort flag. If the Trio side is
    cancelled, the flag is set and the thread is waited on for ``ABORT_TIMEOUT`` at most, then
    abandoned (logged); a thread still queued for the limiter is simply never started."""

    def __init__(self, limiter: trio.CapacityLimiter | None) -> None:
        self.limiter = limiter
        self.abort = threading.Event()
        self.started = threading.Event()
        self.done = trio.Event()
        # How the thread wakes Trio without waiting for it (run_sync_soon: no round trip per wake-up).
        self.trio_token = trio.lowlevel.current_trio_token()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        token = _abort.set(self.abort)  # to_thread runs the function in a copy of this context
        try:
            return await trio.to_thread.run_sync(
                self._in_thread, fn, args, limiter=self.limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            self.abort.set()
            if self.started.is_set():
                with trio.move_on_after(ABORT_TIMEOUT, shield=True):
                    await self.done.wait()
                if not self.done.is_set():
                    _log.warning("engine.abandoned", what=getattr(fn, "__qualname__", "thread"))
            raise
        finally:
            _abort.reset(token)

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        self.started.set()
        try:
            if self.abort.is_set():
                raise _NotStarted  # cancelled as it got its thread (nobody waits for the result)
            return fn(*args)
        finally:
            with contextlib.suppress(trio.RunFinishedError):  # abandoned, and the worker exited since
                self.trio_token.run_sync_soon(self.done.set)


class _NotStarted(Exception):
    pass


async def thread_call(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None) -> T:
    """Trio: run the blocking ``fn(*args)`` in a thread (of ``limiter``, default Trio's) and return its
    result. A cancelled handler sets ``abort_requested()`` and waits for the thread to return
    (``ABORT_TIMEOUT`` at most); an exception in it arrives as ``EngineError`` (or as itself, for an
    ``IngressError``)."""
    try:
        with _engine_work():
            return await _Thread(limiter).run(fn, *args)
    except trio.Cancelled:
        raise
    except Exception as exc:
        raise _engine_error(exc) from exc


@asynccontextmanager
async def thread_stream(
    fn: Callable[..., Iterator[T]],
    *args: Any,
    max_batch: int = DEFAULT_MAX_BATCH,
    limiter: trio.CapacityLimiter | None = None,
) -> AsyncIterator[AsyncIterator[T]]:
    """Trio: iterate the blocking generator ``fn(*args)`` in a thread, as a Trio async iterator.

    The thread waits while ``max_batch`` items are untaken (a slow caller holds the engine back) and
    crosses into Trio only to wake a handler that waits for items. Leaving the block early sets
    ``abort_requested()``, wakes the thread, closes the generator (its ``finally`` runs) and waits
    for the thread to return, ``ABORT_TIMEOUT`` at most."""
    _check_batch(max_batch)
    thread = _Thread(limiter)
    channel = _ThreadChannel(max_batch, thread.abort, thread.trio_token)
    with _engine_work():
        async with open_background_nursery() as nursery:
            # The producer answers only to its own scope, so that what ends this block (a cancellation
            # from outside, an error, GeneratorExit) ends it the same way: flag, bounded wait, gone.
            producer = trio.CancelScope(shield=True)
            nursery.start_soon(_produce, producer, thread, channel, fn, args)
            try:
                yield channel
            finally:
                channel.close()
                producer.cancel()


async def _produce(
    scope: trio.CancelScope,
    thread: _Thread,
    channel: _ThreadChannel,
    fn: Callable[..., Iterator[Any]],
    args: tuple[Any, ...],
) -> None:
    with scope:
        try:
            await thread.run(channel.produce, fn, args)
        except trio.Cancelled:
            raise
        except BaseException as exc:  # produce itself failed (not the engine's items): end the stream
            channel.fail(exc, in_trio=True)


class _ThreadChannel:
    """A bounded hand-over from one producer thread to one Trio consumer, crossing only to wake it."""

    def __init__(self, max_batch: int, abort: threading.Event, trio_token: trio.lowlevel.TrioToken) -> None:
        self.max_batch = max_batch
        self.abort = abort
        self.trio_token = trio_token
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.buffer: deque[Any] = deque()
        self.held_back = threading.Event()  # set while the producer waits for room (the reader is slow)
        self.ended = False
        self.error: BaseException | None = None
        self._wakeup: trio.Event | None = None  # set while the consumer waits for items

    # thread side

    def produce(self, fn: Callable[..., Iterator[Any]], args: tuple[Any, ...]) -> None:
        items: Iterator[Any] | None = None
        try:
            items = fn(*args)
            for item in items:
                with self.lock:
                    while len(self.buffer) >= self.max_batch and not self.abort.is_set():
                        self.held_back.set()
                        self.room.wait()
                    self.held_back.clear()
                    if self.abort.is_set():
                        break
                    self.buffer.append(item)
                self._wake()
        except Exception as exc:
            self.error = exc
        finally:
            try:
                close = getattr(items, "close", None)  # None too if fn itself raised
                if close is not None:
                    close()  # the generator's finally runs here, in its own thread
            except Exception as exc:
                self.error = self.error or exc
            finally:
                self.fail(None)

    def fail(self, error: BaseException | None, *, in_trio: bool = False) -> None:
        """The stream is over (with ``error``, if not None and none was recorded): wake the consumer."""
        with self.lock:
            self.error = self.error or error
            self.ended = True
        self._wake(in_trio=in_trio)

    def _wake(self, *, in_trio: bool = False) -> None:
        with self.lock:
            wakeup, self._wakeup = self._wakeup, None
        if wakeup is None:
            return
        if in_trio:
            wakeup.set()
            return
        # Not from_thread.run_sync: the producer goes on while Trio wakes up, so items batch up.
        with contextlib.suppress(trio.RunFinishedError):  # an abandoned thread, after the worker exited
            self.trio_token.run_sync_soon(wakeup.set)

    # Trio side

    def __aiter__(self) -> _ThreadChannel:
        return self

    async def __anext__(self) -> Any:
        while True:
            with self.lock:
                if self.buffer:
                    item = self.buffer.popleft()
                    self.room.notify()
                    return item
                if self.ended:
                    if self.error is not None:
                        raise _engine_error(self.error) from self.error
                    raise StopAsyncIteration
                wakeup = self._wakeup = trio.Event()
            await wakeup.wait()

    def close(self) -> None:
        self.abort.set()
        with self.lock:
            self.room.notify_all()
