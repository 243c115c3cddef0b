"""Runs one request, the same way for every transport.

``dispatch`` counts the request in flight, passes admission, runs the handler inside the request's
cancel scope (which carries the caller's deadline and answers ``ctx.kill()``), streams chunks to the
transport's sink, turns every way a request can end into exactly one outcome, and writes the metrics
and the canonical log line. Transports reach it through the intake (runtime/_intake.py, ``Call.run``),
which also decodes the payload here (``dispatch_payload``); they only frame bytes on the wire.
"""

from __future__ import annotations

import math
from contextlib import aclosing
from typing import Any

import trio
from structlog.contextvars import bind_contextvars, reset_contextvars

from ._admission import Rejected
from ._context import KillReason, RequestContext
from ._endpoint import CallerGone, EndpointBinding, ResponseSink
from ._errors import BadRequest, DeadlineExceeded, IngressError, InternalError, sole_exception
from ._exchange import Inbox, Messages
from ._payload import decode_payload, encode_json, parse_deadline

# How each kill reason is recorded in ingress_requests_total{outcome}.
_KILL_OUTCOMES = {
    KillReason.CALLER_KILL: "cancelled",
    KillReason.DISCONNECTED: "disconnected",
    KillReason.SHUTDOWN: "shutdown",
    KillReason.BAD_INPUT: "error",  # as if the handler had read the broken input and raised its error
}

# A streaming handler whose chunks are ready at once (a connection with room never makes it wait) gives
# the other tasks a turn after this many chunks, when they came within BURST_SECONDS: without it each
# such handler ran its whole stream in one turn of Trio's scheduler, and a new stream's first chunk
# waited behind every running stream (with 256 streams saturating the worker, 5.5x a plain Trio
# server's first-chunk p50). A handler that waits between chunks (a model's inter-token latency)
# already yields there and is left alone. Every 8 chunks keeps most of what coalescing buys; a yield
# per chunk, as a plain server's send_all does, cost 4x the CPU per token (docs/performance.md).
YIELD_EVERY_CHUNKS = 8
BURST_SECONDS = 0.001


async def dispatch(
    binding: EndpointBinding,
    ctx: RequestContext,
    request: Any,
    sink: ResponseSink,
    inbox: Inbox | None = None,
) -> str:
    """Run ``request`` on ``binding``'s endpoint and answer through ``sink``; returns the outcome.

    The request counts as in flight from ``binding.accept(ctx)`` (the intake's ``Caller.open``; called
    here too, a no-op then, for a context dispatched directly, as tests do) until this returns.
    """
    if inbox is None and binding.endpoint.duplex:
        # Dispatched directly (a test): an exchange whose caller sends nothing and has half-closed.
        inbox = Inbox(binding.endpoint.options.max_input_bytes)
        inbox.end()
    run = _Run(binding, ctx, sink, inbox)
    binding.accept(ctx)
    # What a handler's own structlog lines carry (merge_contextvars). Set here and reset by token before
    # this returns, so nothing outlives the request even when a transport runs it in a shared task; tasks
    # the handler spawns inherit it. One bind and one reset: four ContextVar sets, no copy of the context.
    tokens = bind_contextvars(
        worker=ctx.runtime.worker_name, endpoint=ctx.endpoint, transport=ctx.transport, request_id=ctx.id
    )
    try:
        await run.execute(request)
    finally:
        if inbox is not None:
            inbox.close()  # the handler is done: what the caller still sends is discarded
        reset_contextvars(**tokens)
        binding.release(ctx)
        run.record()
    return run.outcome


async def dispatch_payload(
    binding: EndpointBinding,
    ctx: RequestContext,
    payload: bytes | bytearray | memoryview,
    sink: ResponseSink,
    *,
    timeout_ms: str | int | None = None,
    deadline_unix: str | None = None,
    timeout_name: str = "timeout",
    inbox: Inbox | None = None,
) -> str:
    """``dispatch`` for a request as it came off the wire: its payload and deadline headers are decoded
    here, the one place every transport goes through, and any failure of either is BAD_REQUEST for
    this request alone (counted like any other outcome). Returns the outcome."""
    try:
        ctx.deadline = parse_deadline(ctx.accepted_at, timeout_ms, deadline_unix, timeout_name=timeout_name)
        request = decode_payload(payload)
    except BadRequest as error:
        return await answer_error(binding, ctx, sink, error)
    return await dispatch(binding, ctx, request, sink, inbox)


async def answer_error(
    binding: EndpointBinding, ctx: RequestContext, sink: ResponseSink, error: IngressError
) -> str:
    """Answer a request that never reached its handler (say, undecodable input) with full accounting;
    returns the outcome (``error``, or ``disconnected`` if its caller had already left)."""
    run = _Run(binding, ctx, sink)
    binding.accept(ctx)
    try:
        await run._fail("error", error)
    finally:
        binding.release(ctx)
        run.record()
    return run.outcome


def settle_unrun(binding: EndpointBinding, ctx: RequestContext, *, gone: str | None = None) -> None:
    """Account for an accepted request that will never run: its caller left first (``gone`` says how;
    outcome ``disconnected``) or its task was cancelled before it reached the dispatcher (``cancelled``)."""
    run = _Run(binding, ctx, None)  # type: ignore[arg-type]  # nothing is sent: nobody is listening
    binding.accept(ctx)
    if gone is not None:
        ctx.caller_gone(gone)
        run._caller_gone()
    binding.release(ctx)
    run.record()


class _Run:
    """The mutable state of one request while it runs (kept off the RequestContext on purpose)."""

    __slots__ = (
        "binding",
        "burst_started",
        "chunks",
        "code",
        "ctx",
        "ended",
        "inbox",
        "outcome",
        "sink",
        "started",
    )

    def __init__(
        self, binding: EndpointBinding, ctx: RequestContext, sink: ResponseSink, inbox: Inbox | None = None
    ) -> None:
        self.binding = binding
        self.ctx = ctx
        self.sink = sink
        self.inbox = inbox
        self.chunks = 0
        self.ended = False
        self.outcome = ""
        self.code: str | None = None
        # Durations are measured from accept (docs/operations.md), which the transport stamped.
        self.started = ctx.accepted_at
        self.burst_started = self.started  # when the current run of YIELD_EVERY_CHUNKS chunks began

    async def execute(self, request: Any) -> None:
        ctx = self.ctx
        try:
            if ctx.kill_reason is not None:
                # Killed (or its caller gone) between accept and now, say by a KILL in the same read
                # as its REQUEST: the handler must not start, not even up to its first checkpoint.
                await self._after_handler()
                return
            if ctx.deadline <= trio.current_time():
                # A request that sat in a client buffer (e.g. during a NATS outage) must not start late.
                raise Rejected("deadline", DeadlineExceeded("deadline had already passed on arrival"))
            # The scope covers the admission queue too, so a kill or a disconnect while queued leaves
            # the queue at once.
            with ctx._scope:
                if ctx.deadline != math.inf:  # the setter costs even when nothing changes
                    ctx._scope.deadline = ctx.deadline
                admission, principal = self.binding.admission, ctx.principal
                await admission.acquire(ctx.deadline, principal.tenant, principal.weight)
                try:
                    await self._run_handler(request)
                finally:
                    admission.release(principal.tenant)
            await self._after_handler()
        except CallerGone:
            self._caller_gone()
        except Rejected as rejected:
            self.binding.metrics.rejection(rejected.reason)
            await self._fail("rejected", rejected.error)
        except IngressError as error:
            await self._fail("error", error)
        except Exception as exc:
            await self._fail_unexpected(exc)
        except BaseException:
            # Cancelled from outside the request (its connection or the whole worker is going away).
            if not self.outcome:
                reason = ctx.kill_reason
                self.outcome = _KILL_OUTCOMES[reason] if reason is not None else "cancelled"
            raise

    async def _run_handler(self, request: Any) -> None:
        endpoint = self.binding.endpoint
        if not endpoint.streaming:
            result = await endpoint.handler(request, self.ctx)
            data = self._encode(result)
            self.binding.metrics.ttfc.observe(trio.current_time() - self.started)
            self.chunks = 1
            await self.sink.send_result(data)
        else:
            # A duplex handler takes the caller's messages where another takes its request.
            source = Messages(self.inbox) if endpoint.duplex and self.inbox is not None else request
            await self._stream(endpoint.handler(source, self.ctx))
            self._input_done()
            await self.sink.send_end(self.chunks)
        self.ended = True

    async def _stream(self, agen: Any) -> None:
        ctx = self.ctx
        idle_limit = self.binding.endpoint.options.inactivity_timeout
        async with aclosing(agen):
            if idle_limit is None:
                async for chunk in agen:
                    await self._send_chunk(chunk)
                    if ctx._stopped:
                        return
                return
            # One scope for the whole stream; its deadline is armed only while waiting on the handler,
            # so a caller that reads slowly (back-pressure in send) is not mistaken for a stalled stream.
            with trio.CancelScope() as idle_watch:
                while True:
                    idle_watch.deadline = trio.current_time() + idle_limit
                    try:
                        chunk = await agen.__anext__()
                    except StopAsyncIteration:
                        return
                    idle_watch.deadline = math.inf
                    await self._send_chunk(chunk)
                    if ctx._stopped:
                        return
            self.binding.metrics.inactivity.inc()
            raise DeadlineExceeded(f"stream produced nothing for {idle_limit:g} s (inactivity_timeout)")

    async def _send_chunk(self, chunk: Any) -> None:
        data = self._encode(chunk)  # before counting: a chunk that cannot be encoded is never sent
        if self.chunks == 0:
            self.binding.metrics.ttfc.observe(trio.current_time() - self.started)
        self.chunks += 1
        await self.sink.send_chunk(data)
        if self.chunks % YIELD_EVERY_CHUNKS == 0:
            now = trio.current_time()
            if now - self.burst_started < BURST_SECONDS:
                await trio.lowlevel.checkpoint()
            self.burst_started = now

    def _encode(self, value: Any) -> bytes:
        """The value as JSON; one that is not JSON is the handler's bug: logged for its author (the
        caller only sees INTERNAL), as a handler exception would be."""
        try:
            return encode_json(value)
        except InternalError as error:
            self.binding.logger.error("handler.bad_value", request_id=self.ctx.id, error=error.message)
            raise

    async def _after_handler(self) -> None:
        ctx = self.ctx
        if self.ended:
            self.outcome = "ok"
        elif ctx.kill_reason is KillReason.DISCONNECTED:
            self._caller_gone()
        elif ctx.kill_reason is not None:
            assert ctx._kill_error is not None
            await self._fail(_KILL_OUTCOMES[ctx.kill_reason], ctx._kill_error)
        else:
            # The scope fired on its own: only the caller's deadline sets it.
            await self._fail("error", DeadlineExceeded("deadline exceeded while running"))

    def _caller_gone(self) -> None:
        self.outcome = "disconnected"
        self.ctx.kill(KillReason.DISCONNECTED)

    def _input_done(self) -> None:
        """The handler will read no more: before the last answer goes out, let the transport discard
        the rest of the input as it comes. A transport that stopped reading because the handler was
        behind (an HTTP body) must read again, or its own last steps (hypercorn telling the app the
        stream closed) could wait behind that unread input."""
        if self.inbox is not None:
            self.inbox.close()

    async def _fail(self, outcome: str, error: IngressError) -> None:
        self._input_done()
        if self.ctx.kill_reason is KillReason.DISCONNECTED:
            # However it failed, nobody is left to tell: the caller leaving is how it ended.
            self._caller_gone()
            return
        self.outcome = outcome
        self.code = error.code.name
        try:
            await self.sink.send_error(error, error.resolve_retryable(chunks_sent=self.chunks))
        except CallerGone:
            self.outcome = "disconnected"

    async def _fail_unexpected(self, exc: Exception) -> None:
        error = _single_ingress_error(exc)
        if error is not None:
            await self._fail("error", error)
            return
        self.binding.logger.error("handler.failed", request_id=self.ctx.id, exc_info=exc)
        # The message is deliberately generic: exception text can carry secrets or prompt content.
        await self._fail("error", InternalError(f"internal error in endpoint {self.binding.name!r}"))

    def record(self) -> None:
        metrics = self.binding.metrics
        elapsed = trio.current_time() - self.started
        metrics.outcomes[self.outcome or "cancelled"].inc()
        if self.outcome == "disconnected":
            # Counted here, with the outcome, so the two can never disagree; a sink that found the
            # connection broken before the transport noticed reports no reason: a reset.
            metrics.disconnect(self.ctx._gone_reason or "reset")
        metrics.duration.observe(elapsed)
        messages_in = None if self.inbox is None else self.inbox.received
        if messages_in is not None:
            metrics.exchange_messages(received=messages_in, sent=self.chunks)
        if not self.binding.access_log:
            return
        self.binding.logger.info(
            "request",
            request_id=self.ctx.id,
            outcome=self.outcome or "cancelled",
            code=self.code,
            chunks=self.chunks,
            messages_in=messages_in,
            duration_ms=round(elapsed * 1000, 3),
            peer=self.ctx.peer,
        )


def _single_ingress_error(exc: BaseException) -> IngressError | None:
    """A handler that used a nursery raises its IngressError wrapped in a group: unwrap a lone one."""
    exc = sole_exception(exc)
    return exc if isinstance(exc, IngressError) else None
