"""Workers with a lifespan for the process tests in test_lifespan.py (``ingress serve engine_apps:...``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from runtime import RequestContext, RuntimeContext, Worker

failing = Worker("failing-engine")


@failing.lifespan
async def _failing_engine(runtime: RuntimeContext) -> AsyncIterator[dict[str, Any]]:
    raise OSError("model weights not found at /models/llama")
    yield {}  # an async generator, as a lifespan must be


@failing.endpoint("echo")
async def echo(request: Any, ctx: RequestContext) -> Any:
    return request
