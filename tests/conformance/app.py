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
- ``context`` (unary): reports what the handler saw: time remaining, metadata, request id.

Every gated handler records on the probe that it was cancelled (``probe.cancelled``), closed early by a
stop (``probe.closed``) and that its ``finally`` ran (``probe.finished``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import trio

from runtime import ErrorCode, IngressError, RequestContext, Worker

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
        }

    return worker
