"""The mock inference engine: the default app of ``ingress serve``, and the workload of tests and benchmarks.

``generate`` streams ``max_tokens`` chunks ``{"index": i, "token": "tok<i>"}``, waiting ``ttft_ms``
before the first and ``itl_ms`` between the others, like a model's prefill and decode. ``echo`` answers
with its request. Run it with ``ingress serve runtime.mocker:worker``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio

from ._context import RequestContext
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


async def echo(request: Any, ctx: RequestContext) -> Any:
    """Answer once, with the request itself."""
    return request


def create_mocker(name: str = "mocker", **generate_options: Any) -> Worker:
    """A fresh mocker worker; ``generate_options`` (max_concurrency, ...) apply to ``generate``."""
    worker = Worker(name)
    worker.endpoint("generate", **generate_options)(generate)
    worker.endpoint("echo")(echo)
    return worker


worker = create_mocker()
