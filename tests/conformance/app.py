"""The conformance worker: one small endpoint per behaviour of the contract, and a ``Probe`` through which
a test holds handlers and learns what happened to them, with events only (no sleeps).

Endpoints (the request is a JSON object unless said otherwise):

- ``echo`` (unary): answers the request as it came.
- ``tokens`` (stream): ``{"n": N, "hold_at": K, "fail_at": F, "error": SPEC}`` yields ``{"i": i}`` for
  i < N; before chunk K it sets ``probe.held`` and waits for ``probe.release``; at chunk F it raises the
  error SPEC describes (see ``raise_chosen``).
- ``fail`` (unary): raises the error its request describes.
- ``limited`` (unary, ``max_concurrency=1, max_queue=0``): holds until ``probe.release``, answers "done".
- ``stalling`` (stream, ``inactivity_timeout=STALL_TIMEOUT``): yields one chunk, then holds.
- ``context`` (unary): reports what the handler saw: time remaining, metadata, request id, principal.
- ``admin`` (unary, ``scopes={"admin"}``): answers "ok" to a caller whose credential grants ``admin``.

Every gated handler records on the probe that it was cancelled (``probe.cancelled``), closed early by a
stop (``probe.closed``) and that its ``finally`` ran (``probe.finished``).

The exchange contract has a worker of its own, ``build_exchange_worker`` (its duplex endpoints are
listed there), with an ``ExchangeProbe`` keyed by request id, since a test may hold several exchanges.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

from runtime import ErrorCode, Inbox, IngressError, RequestContext, Worker

# The inactivity_timeout of ``stalling``: short, so the test is quick; nothing else uses it.
STALL_TIMEOUT = 0.3


@dataclass
class Probe:
    """Events shared by a test and the handlers of its worker."""

    held: trio.Event = field(default_factory=trio.Event)  # a handler waits at its gate
    release: trio.Event = field(default_factory=trio.Event)  # set by the test: gated handlers go on
    cancelled: trio.Event = field(default_factory=trio.Event)  # a handler saw trio.Cancelled
    closed: trio.Event = field(default_factory=trio.Event)  # a stream was closed early (GeneratorExit)
    finished: trio.Event = field(default_factory=trio.Event)  # a gated handler's finally ran
    contexts: list[RequestContext] = field(default_factory=list)  # of every gated handler, in order

    async def hold(self, ctx: RequestContext) -> None:
        self.contexts.append(ctx)
        self.held.set()
        await self.release.wait()


def raise_chosen(spec: dict[str, Any]) -> None:
    """``{"plain": TEXT}`` raises a plain RuntimeError(TEXT); ``{"code": NAME, "message": M,
    "retryable": R}`` raises an IngressError with that code (R may be absent: the default rule)."""
    if "plain" in spec:
        raise RuntimeError(spec["plain"])
    error = IngressError(spec.get("message", "chosen by the handler"), retryable=spec.get("retryable"))
    error.code = ErrorCode[spec["code"]]
    raise error


def build_worker(probe: Probe) -> Worker:
    worker = Worker("conformance")

    @worker.endpoint("echo")
    async def echo(request: Any, ctx: RequestContext) -> Any:
        return request

    @worker.endpoint("tokens")
    async def tokens(request: dict[str, Any], ctx: RequestContext) -> Any:
        try:
            for i in range(request.get("n", 3)):
                if i == request.get("hold_at"):
                    await probe.hold(ctx)
                if i == request.get("fail_at"):
                    raise_chosen(request.get("error", {"code": "INTERNAL", "message": "failed half-way"}))
                yield {"i": i}
                await trio.lowlevel.checkpoint()  # a fast stream still lets other tasks run
        except trio.Cancelled:
            probe.cancelled.set()
            raise
        except GeneratorExit:
            probe.closed.set()
            raise
        finally:
            probe.finished.set()

    @worker.endpoint("fail")
    async def fail(request: dict[str, Any], ctx: RequestContext) -> Any:
        raise_chosen(request)

    @worker.endpoint("limited", max_concurrency=1, max_queue=0)
    async def limited(request: Any, ctx: RequestContext) -> str:
        try:
            await probe.hold(ctx)
        except trio.Cancelled:
            probe.cancelled.set()
            raise
        finally:
            probe.finished.set()
        return "done"

    @worker.endpoint("stalling", inactivity_timeout=STALL_TIMEOUT)
    async def stalling(request: Any, ctx: RequestContext) -> Any:
        try:
            yield {"i": 0}
            await probe.hold(ctx)
            yield {"i": 1}
        except trio.Cancelled:
            probe.cancelled.set()
            raise
        finally:
            probe.finished.set()

    @worker.endpoint("context")
    async def context(request: Any, ctx: RequestContext) -> dict[str, Any]:
        remaining = ctx.time_remaining()
        return {
            "remaining": None if math.isinf(remaining) else remaining,  # JSON has no Infinity
            "metadata": dict(ctx.metadata),
            "id": ctx.id,
            "principal": {"subject": ctx.principal.subject, "tenant": ctx.principal.tenant},
        }

    @worker.endpoint("admin", scopes={"admin"})
    async def admin(request: Any, ctx: RequestContext) -> str:
        return "ok"

    return worker


# ---- the exchange contract's worker (test_exchange_contract.py) ---------------------------------------

# late_reader's max_input_bytes: two 26-byte messages fit, a third waits (a window this small makes the
# bound visible with a handful of messages).
INPUT_WINDOW = 64
# quiet's input_timeout: short, so the test is quick; nothing else uses it.
INPUT_TIMEOUT = 0.2


@dataclass
class ExchangeProbe:
    """Events shared by a test and the exchange handlers of its worker, by request id (a test may hold
    several exchanges at once, and every exchange driver names each one)."""

    release: trio.Event = field(default_factory=trio.Event)  # set by the test: held handlers go on
    reading: trio.Event = field(default_factory=trio.Event)  # late_reader takes its input once set
    held: dict[str, trio.Event] = field(default_factory=dict)  # a handler waits at its gate
    cancelled: set[str] = field(default_factory=set)  # handlers that saw trio.Cancelled
    produced: dict[str, int] = field(default_factory=dict)  # flood: chunks yielded so far
    inboxes: dict[str, Inbox] = field(default_factory=dict)  # late_reader: its exchange's input
    _input: trio.Event = field(default_factory=trio.Event)  # set (and renewed) as a watched inbox takes one

    def held_event(self, request_id: str) -> trio.Event:
        return self.held.setdefault(request_id, trio.Event())

    async def hold(self, ctx: RequestContext) -> None:
        self.held_event(ctx.id).set()
        await self.release.wait()

    def watch(self, ctx: RequestContext, messages: Any) -> None:
        """Watch the core's inbox behind ``messages``: the bound on input waiting for a handler lives
        there, and only there can a test see what a transport handed over (the inbox is the core's,
        not public: a handler never needs it)."""
        inbox: Inbox = messages._inbox
        offer = inbox.offer

        def offered(data: bytes | bytearray | memoryview) -> bool:
            taken = offer(data)
            self._input.set()
            self._input = trio.Event()
            return taken

        inbox.offer = offered  # type: ignore[method-assign]  # an observer around the core's own method
        self.inboxes[ctx.id] = inbox
        self._input.set()
        self._input = trio.Event()

    async def wait_input(self, request_id: str, received: int) -> Inbox:
        """Wait until the exchange ``request_id``'s inbox has taken ``received`` messages in all."""
        while (inbox := self.inboxes.get(request_id)) is None or inbox.received < received:
            await self._input.wait()
        return inbox


def build_exchange_worker(probe: ExchangeProbe) -> Worker:
    """Duplex endpoints, one per behaviour of the exchange contract (each message is a JSON value):

    - ``chat``: the mocker's (runtime/mocker.py): each ``{"max_tokens": n, "itl_ms": t}`` answered by n
      chunks ``{"turn": k, "index": i, "token": ...}``.
    - ``greet_first``: yields ``{"hello": true}`` before it reads anything, then ``{"echo": m}`` for each.
    - ``batch``: reads two messages, then answers them as one list (the odd one out after the half-close).
    - ``first_only``: answers its first message with itself and returns while the caller may still send.
    - ``late_reader`` (``max_input_bytes=INPUT_WINDOW``): takes nothing until ``probe.reading``, then
      answers each message with itself.
    - ``flood``: its first message ``{"n": N, "pad": P}``; yields ``{"i": i, "pad": "x" * P}`` for i < N
      (counting them in ``probe.produced``), holds, then yields ``{"i": N, ...}`` and ends.
    - ``held``: answers each message with ``{"echo": m}``, then holds; records a cancellation.
    - ``quiet`` (``input_timeout=INPUT_TIMEOUT``): answers each message with ``{"echo": m}``.
    """
    from runtime.mocker import chat

    worker = Worker("conformance-exchanges")
    worker.endpoint("chat", duplex=True)(chat)

    @worker.endpoint("greet_first", duplex=True)
    async def greet_first(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        yield {"hello": True}
        async for message in messages:
            yield {"echo": message}

    @worker.endpoint("batch", duplex=True)
    async def batch(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        pending: list[Any] = []
        async for message in messages:
            pending.append(message)
            if len(pending) == 2:
                yield pending
                pending = []
        if pending:
            yield pending

    @worker.endpoint("first_only", duplex=True)
    async def first_only(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message
            return

    @worker.endpoint("late_reader", duplex=True, max_input_bytes=INPUT_WINDOW)
    async def late_reader(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        probe.watch(ctx, messages)
        await probe.reading.wait()
        async for message in messages:
            yield message

    @worker.endpoint("flood", duplex=True)
    async def flood(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        spec = await anext(messages)
        pad = "x" * spec.get("pad", 0)
        for i in range(spec["n"]):
            probe.produced[ctx.id] = i + 1
            yield {"i": i, "pad": pad}
        await probe.hold(ctx)
        yield {"i": spec["n"], "pad": pad}

    @worker.endpoint("held", duplex=True)
    async def held(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        try:
            async for message in messages:
                yield {"echo": message}
                await probe.hold(ctx)
        except trio.Cancelled:
            probe.cancelled.add(ctx.id)
            raise

    @worker.endpoint("quiet", duplex=True, input_timeout=INPUT_TIMEOUT)
    async def quiet(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield {"echo": message}

    return worker
