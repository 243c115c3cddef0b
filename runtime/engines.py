"""Engines that are not Trio code, called from handlers: asyncio engines through the worker's one asyncio
loop (trio-asyncio), blocking engines in threads. See docs/engines.md.

The guarantees a handler has stop nowhere on the way: a handler cancelled for any reason (caller gone,
kill, deadline, inactivity, forced drain) cancels the engine's side at once and waits until it has
finished cancelling, so the engine's own cleanup (an ``engine.abort(request_id)``) has run before the
request counts as done; an error on the engine's side arrives in the handler as an ``IngressError``
(``EngineError``, INTERNAL with the engine's message, unless the engine raised an ``IngressError``
itself), never as a hang; and a slow caller slows the engine instead of buffering its output, because
at most ``max_batch`` items wait on the engine's side of the bridge.

asyncio:
    ``await aio_call(engine.start)``; ``async with aio_stream(engine.generate(...), on_abort=...) as
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio

from ._errors import IngressError, InternalError, Unavailable, describe
from ._nursery import open_background_nursery, unwrap_body_error

T = TypeVar("T")

# Items an engine may have produced that the handler has not taken yet (per stream): the bound that makes
# a slow caller hold the engine back. Also the most items one crossing of the bridge carries.
DEFAULT_MAX_BATCH = 64
# Bound on an engine's abort (its cancellation, then ``on_abort``): a hung engine must not hold a
# request, and so the drain, forever.
ABORT_TIMEOUT = 5.0


class EngineError(InternalError):
    """The engine failed: the caller gets INTERNAL with the engine's message (engines' messages are
    meant for their users, unlike a handler's own exceptions, whose text stays in the log)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"engine error: {type(cause).__name__}: {describe(cause)}")


def _engine_error(exc: BaseException) -> IngressError:
    if isinstance(exc, IngressError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        # The engine cancelled the request itself (it is shutting down, say): nothing was asked of it.
        return Unavailable("the engine cancelled the request")
    return EngineError(exc)


# ---- the worker's asyncio loop --------------------------------------------------------------------


@asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """The asyncio loop of this Trio task's context: the one already open (the worker's, shared by the
    NATS transport and handlers) or, if there is none, a new one for the duration of the block."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        yield loop
        return
    async with unwrap_body_error(trio_asyncio.open_loop()) as loop:
        yield loop


def _loop() -> trio_asyncio.TrioEventLoop:
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError(
            "no asyncio loop: create the worker with Worker(name, asyncio=True) to call asyncio engines"
        )
    return loop


async def aio_call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Trio: await the asyncio coroutine function ``fn(*args, **kwargs)`` on the worker's loop.

    If the handler is cancelled, the asyncio task is cancelled and this waits until it has finished
    cancelling; an exception on the asyncio side arrives as ``EngineError`` (or as itself, for an
    ``IngressError``), an asyncio-side cancellation the handler did not ask for as UNAVAILABLE."""
    loop = _loop()
    try:
        return await trio_asyncio.aio_as_trio(fn, loop=loop)(*args, **kwargs)  # type: ignore[no-any-return]
    except (IngressError, trio.Cancelled):
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

    An asyncio task pulls items into a buffer of at most ``max_batch``; each crossing takes everything
    ready. If the block is left before the engine's iterator ended (the handler was cancelled, or
    stopped early), the task is cancelled (the engine's generator sees ``CancelledError`` at its
    ``await``), awaited, and then ``on_abort()`` runs on the loop (an asyncio coroutine function or
    a plain one): the documented place for ``engine.abort(request_id)``."""
    loop = _loop()
    pump = _AioPump(items, max_batch)
    try:
        await trio_asyncio.aio_as_trio(pump.start, loop=loop)()
        yield _Batches(trio_asyncio.aio_as_trio(pump.take, loop=loop))
    finally:
        if not pump.finished:
            with trio.move_on_after(ABORT_TIMEOUT, shield=True):
                await trio_asyncio.aio_as_trio(pump.abort, loop=loop)(on_abort)


class _AioPump:
    """asyncio: the task that pulls an engine's items into a bounded buffer for the Trio side."""

    def __init__(self, items: AsyncIterator[Any], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.items = items
        self.max_batch = max_batch
        self.buffer: list[Any] = []
        self.finished = False  # the engine's iterator ended, cleanly or with an error
        self.error: BaseException | None = None
        self.task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self.ready = asyncio.Event()  # the buffer has something, or the iterator ended
        self.room = asyncio.Event()  # the buffer has room
        self.room.set()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for item in self.items:
                self.buffer.append(item)
                self.ready.set()
                if len(self.buffer) >= self.max_batch:
                    self.room.clear()
                    await self.room.wait()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                self.error = asyncio.CancelledError()  # the engine cancelled it, not us: an error
                self.finished = True
            raise
        except Exception as exc:
            self.error = exc
            self.finished = True
        else:
            self.finished = True
        finally:
            self.ready.set()

    async def take(self) -> tuple[list[Any], BaseException | None, bool]:
        """Everything ready (waits for at least one item, or the end): (items, error, ended)."""
        await self.ready.wait()
        batch, self.buffer = self.buffer, []
        if not self.finished:
            self.ready.clear()
        self.room.set()
        return batch, self.error, self.finished

    async def abort(self, on_abort: Callable[[], Any] | None) -> None:
        if self.task is not None:
            self.task.cancel()
            # It was cancelled: whatever it raised on the way out is the engine's own business.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        aclose = getattr(self.items, "aclose", None)
        if aclose is not None:
            await aclose()
        if on_abort is not None:
            result = on_abort()
            if inspect.isawaitable(result):
                await result


class _Batches:
    """Trio: the handler's iterator over what the pump hands over, one crossing per batch."""

    def __init__(self, take: Callable[[], Awaitable[tuple[list[Any], BaseException | None, bool]]]) -> None:
        self._take = take
        self.crossings = 0  # how many times items came over the bridge (batching, for tests)
        self._items: deque[Any] = deque()
        self._error: BaseException | None = None
        self._ended = False

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise _engine_error(self._error) from self._error
                raise StopAsyncIteration
            batch, self._error, self._ended = await self._take()
            self.crossings += 1
            self._items.extend(batch)
        return self._items.popleft()


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


async def thread_call(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None) -> T:
    """Trio: run the blocking ``fn(*args)`` in a thread (of ``limiter``, default Trio's) and return its
    result. A cancelled handler sets ``abort_requested()`` and waits for the thread to return (so the
    drain waits for it too); an exception in it arrives as ``EngineError`` (or as itself, for an
    ``IngressError``)."""
    flag = threading.Event()
    token = _abort.set(flag)  # to_thread runs fn in a copy of this context
    try:
        async with open_background_nursery() as nursery:
            nursery.start_soon(_raise_flag_when_cancelled, flag)
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=False)
            except (IngressError, trio.Cancelled):
                raise
            except Exception as exc:
                raise EngineError(exc) from exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        _abort.reset(token)


async def _raise_flag_when_cancelled(flag: threading.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        flag.set()  # cancelled: the handler's, or the call's own when fn returned (harmless then)


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
    for the thread to return."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    channel = _ThreadChannel(max_batch)
    token = _abort.set(channel.abort)
    try:
        async with open_background_nursery() as nursery:
            nursery.start_soon(_run_producer, channel, fn, args, limiter)
            try:
                yield channel
            finally:
                channel.close()
    finally:
        _abort.reset(token)


async def _run_producer(
    channel: _ThreadChannel, fn: Callable[..., Iterator[Any]], args: tuple[Any, ...], limiter: Any
) -> None:
    with trio.CancelScope(shield=True):  # the thread always runs to its end; close() makes that quick
        await trio.to_thread.run_sync(channel.produce, fn, args, limiter=limiter, abandon_on_cancel=False)


class _ThreadChannel:
    """A bounded hand-over from one producer thread to one Trio consumer, crossing only to wake it."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.buffer: deque[Any] = deque()
        self.abort = threading.Event()
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
            close = getattr(items, "close", None)  # None too if fn itself raised
            if close is not None:
                close()  # the generator's finally runs here, in its own thread
            with self.lock:
                self.ended = True
            self._wake()

    def _wake(self) -> None:
        with self.lock:
            wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            trio.from_thread.run_sync(wakeup.set)

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
