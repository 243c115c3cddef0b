"""The NATS transport: queue-group subscriptions per endpoint, streamed replies with sequence numbers,
caller-gone probes, STOP/KILL, and NatsClient. nats-py runs through trio-asyncio; all asyncio code is in
``_aio``. See docs/protocol-nats.md.

Names are imported on first use (PEP 562), so loading the command-line plug-in (``_plugin``) does not
import nats-py or trio-asyncio."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import NatsClient as NatsClient
    from ._client import RetryBudget as RetryBudget
    from ._server import NatsTransport as NatsTransport

_WHERE = {"NatsClient": "._client", "RetryBudget": "._client", "NatsTransport": "._server"}
__all__ = ["NatsClient", "NatsTransport", "RetryBudget"]


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
