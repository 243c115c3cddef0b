"""The NATS transport: queue-group subscriptions per endpoint, streamed replies with sequence numbers,
caller-gone probes, STOP/KILL, and NatsClient. nats-py runs through trio-asyncio; all asyncio code is in
``_aio``. See docs/protocol-nats.md."""

from ._client import NatsClient as NatsClient
from ._client import RetryBudget as RetryBudget
from ._server import NatsTransport as NatsTransport

__all__ = ["NatsClient", "NatsTransport", "RetryBudget"]
