"""The NATS transport: queue-group subscriptions per endpoint, streamed replies with sequence numbers,
caller-gone probes, STOP/KILL, and NatsClient. nats-py runs through trio-asyncio; all asyncio code is in
``_aio``. See docs/protocol-nats.md.

Names are imported on first use (PEP 562), so loading the command-line plug-in (``_plugin``) does not
import nats-py or trio-asyncio."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from runtime import RetryBudget as RetryBudget

    from ._client import NatsClient as NatsClient
    from ._server import NatsTransport as NatsTransport

# RetryBudget lives in the core (every client shares it); it stays importable from here too.
_WHERE = {"NatsClient": "._client", "RetryBudget": "._client", "NatsTransport": "._server"}
__all__ = ["NatsClient", "NatsTransport", "RetryBudget"]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
